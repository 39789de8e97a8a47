"""rsd_core: the science of Restoration Score Distillation, in pure torch (no Flyte, no MLflow)."""

__version__ = "0.1.0"
