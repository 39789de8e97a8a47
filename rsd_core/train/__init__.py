"""Training: the EDM-preconditioned U-Net, the corruption-aware objectives, the shared training loop, teacher
pretraining, SiD/RSD distillation into a one-step generator, and the samplers."""
