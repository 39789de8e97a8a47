"""Model selection without clean data: Frechet distances and their intervals, KID, the feature extractors
(self-supervised on the observations; Inception and classifiers for evaluation only) and Proximal FID selection."""
