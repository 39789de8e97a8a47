"""Restoring observations with a trained prior: posterior-mean networks, latent optimisation through the
generator, DPS with the teacher, classical baselines and data-consistency projections, and image metrics."""
