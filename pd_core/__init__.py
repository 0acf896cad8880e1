"""pd_core: progressive distillation in pure PyTorch (no Prefect, no MLflow)."""

from pd_core import denoiser, distill, losses, parameterization, samplers, schedule, unet, weighting

__all__ = ["denoiser", "distill", "losses", "parameterization", "samplers", "schedule", "unet", "weighting"]
