"""pd_core: progressive distillation in pure PyTorch (no Prefect, no MLflow).

The math modules load on first use (``pd_core.schedule`` or ``from pd_core import schedule``), so
``pd_core.config`` validates a config without importing torch.
"""

import importlib

__all__ = ["denoiser", "distill", "losses", "parameterization", "samplers", "schedule", "unet", "weighting"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"pd_core.{name}")
    raise AttributeError(f"module 'pd_core' has no attribute {name!r}")
