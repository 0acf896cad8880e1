"""A diffusers ``UNet2DModel`` and its DDPM scheduler config as a denoiser ``(z, logsnr) -> (x_hat, eps_hat)``.

A model trained in discrete time sees timestep k of its table alpha_bar_k (``alphas_cumprod``).
Its noise schedule is :class:`~pd_core.schedule.DiscreteSchedule` of the scheduler's own float32
table (what diffusers computes from the config, not a re-derivation), and the network runs at the
timestep tau = timestep(lambda) that schedule assigns to a log-SNR (:class:`DiffusersUNetNet`; an
integer on every sampler grid), so DDIM over it is diffusers' "trailing" DDIM. Which folders and
configs are accepted is :mod:`pd_core.interop.diffusers_folder` and :mod:`pd_core.interop.schedulers`
(every scheduler setting not used is logged as a warning at import); weights come from safetensors only.

Stored checkpoints hold the state dict of :class:`DiffusersUNetNet`, i.e. the UNet2DModel's
tensors under ``unet.``; :func:`unet_state_dict` strips that prefix again.
diffusers itself is imported inside the functions that need it (an optional dependency).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from pd_core._checks import state_misfit
from pd_core.interop.bounds import weights_header
from pd_core.interop.diffusers_folder import WEIGHTS_NAME, DiffusersImportError, FolderConfigs, read_configs
from pd_core.schedule import DiscreteSchedule

log = logging.getLogger(__name__)
PREFIX = "unet."  # key prefix of the UNet2DModel's tensors inside DiffusersUNetNet's state dict
MAX_WEIGHTS_BYTES = 8 << 30  # bigger than any UNet2DModel published so far


def require_diffusers():
    """The ``diffusers`` module, or ImportError saying how to install the optional extra."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError(f"this needs the optional diffusers package ({err}): pip install -e '.[diffusers]'") from None
    return diffusers


@dataclass(frozen=True)
class DiffusersModel:
    """What an import reads: the UNet2DModel's config and tensors, the scheduler config, and what follows from it."""

    unet_config: dict  # UNet2DModel config, private ("_"-prefixed) keys removed
    scheduler_config: dict  # the scheduler's config as saved (private keys removed)
    weights: dict[str, Tensor]  # DiffusersUNetNet state dict (the UNet2DModel's tensors under "unet.")
    parameterization: str  # eps / v / x from prediction_type
    schedule: DiscreteSchedule  # the scheduler's own float32 alphas_cumprod
    source: str  # the location it was read from
    weights_sha256: str  # sha256 of the safetensors file as read

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps."""
        return self.schedule.num_timesteps


def _read_weights_bytes(configs: FolderConfigs) -> bytes:
    check_weights_header(configs)  # declared sizes and shapes before a byte of tensor data is read
    return configs.folder.read(*[p for p in (configs.model_dir, WEIGHTS_NAME) if p], limit=MAX_WEIGHTS_BYTES)


def weights_sha256(uri: str, *, storage_options: dict | None = None) -> str:
    """sha256 of a diffusers folder's UNet2DModel safetensors file (what an import records as its parent)."""
    return hashlib.sha256(_read_weights_bytes(read_configs(uri, storage_options=storage_options))).hexdigest()


def _read_weights(configs: FolderConfigs) -> tuple[dict[str, Tensor], str]:
    """The UNet2DModel's tensors (float32, under ``unet.``) and the sha256 of the file's bytes."""
    url = configs.weights_url()
    raw = _read_weights_bytes(configs)
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise DiffusersImportError(f"{url} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    weights = {PREFIX + k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return weights, hashlib.sha256(raw).hexdigest()


def scheduler_alphas_cumprod(scheduler_config: dict, *, source: str) -> Tensor:
    """The scheduler's alpha_bar table exactly as diffusers computes it (float32, from its own betas)."""
    scheduler_cls = require_diffusers().DDPMScheduler
    try:
        scheduler = scheduler_cls.from_config(scheduler_config)
    except (NotImplementedError, ValueError, TypeError) as err:
        raise DiffusersImportError(f"{source}: diffusers cannot build this scheduler "
                                   f"({str(err).splitlines()[0]})") from None
    return scheduler.alphas_cumprod.clone()


def read_diffusers_model(uri: str, *, storage_options: dict | None = None) -> DiffusersModel:
    """Read a diffusers folder (``diffusers:<folder>`` or the bare location); checked, never unpickled."""
    configs = read_configs(uri, storage_options=storage_options)
    try:
        schedule = DiscreteSchedule(scheduler_alphas_cumprod(configs.scheduler_config,
                                                             source=configs.scheduler_source))
    except DiffusersImportError:
        raise
    except ValueError as err:  # a table DiscreteSchedule refuses (not decreasing, values outside (0, 1))
        raise DiffusersImportError(f"{configs.scheduler_source}: {err}") from None
    weights, sha256 = _read_weights(configs)
    for note in configs.scheduler_notes:  # every scheduler setting the import does not use, and why
        log.warning("%s", note)
    check_weights_fit(weights, configs.unet_config, source=configs.weights_url())
    return DiffusersModel(unet_config=configs.unet_config, scheduler_config=configs.scheduler_config,
                          weights=weights, parameterization=configs.parameterization, schedule=schedule,
                          source=configs.folder.location, weights_sha256=sha256)


def build_unet(unet_config: dict, *, dropout: float | None = None) -> nn.Module:
    """A freshly initialised UNet2DModel of ``unet_config`` (``dropout`` replaces the config's when given)."""
    config = dict(unet_config) if dropout is None else {**unet_config, "dropout": float(dropout)}
    return require_diffusers().UNet2DModel.from_config(config)


@functools.lru_cache(maxsize=16)
def _state_shapes(config_json: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: nothing allocated, nothing drawn from the RNG
        unet = build_unet(json.loads(config_json))
    return {PREFIX + k: tuple(v.shape) for k, v in unet.state_dict().items()}


def state_shapes(unet_config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of :class:`DiffusersUNetNet`'s state dict for ``unet_config`` (cached)."""
    return _state_shapes(json.dumps(unet_config, sort_keys=True))


def check_weights_fit(tensors: dict[str, Tensor], unet_config: dict, *, source: str) -> None:
    """DiffusersImportError (one line, naming the first misfit) unless ``tensors`` fit ``unet_config`` exactly."""
    want = {k[len(PREFIX):]: shape for k, shape in state_shapes(unet_config).items()}
    misfit = state_misfit(unet_state_dict(tensors), want)  # named as in the model's own files
    if misfit is not None:
        raise DiffusersImportError(f"{source}: the weights do not fit the UNet2DModel config ({misfit}); save the "
                                   f"model and its config together with save_pretrained")


def check_weights_header(configs: FolderConfigs) -> None:
    """DiffusersImportError unless the safetensors header fills the file exactly and its shapes fit the config."""
    url = configs.weights_url()
    folder = configs.folder
    header = weights_header(folder.fs, folder.path(*[p for p in (configs.model_dir, WEIGHTS_NAME) if p]), source=url)
    check_weights_fit({PREFIX + k: torch.empty(shape, device="meta") for k, (_, shape) in header.items()},
                      configs.unet_config, source=url)


def unet_state_dict(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A stored DiffusersUNetNet state dict as the UNet2DModel's own (``unet.`` prefix removed)."""
    return {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}


class DiffusersUNetNet(nn.Module):
    """net(z, logsnr, y) = unet(z, tau(logsnr), class_labels=y).sample, tau from the model's own schedule.

    The network :class:`~pd_core.denoiser.Denoiser` wraps for an imported model: it maps the
    log-SNR the samplers and the distillation target work in to the timestep the UNet2DModel was
    trained on (:meth:`DiscreteSchedule.timestep`: an integer at every grid point). :meth:`at_timestep` calls it at
    a given timestep (the ONNX export bakes the timesteps in as constants).
    """

    def __init__(self, unet: nn.Module, *, schedule: DiscreteSchedule):
        super().__init__()
        self.unet = unet
        self.schedule = schedule

    def at_timestep(self, z: Tensor, timestep: Tensor, y: Tensor | None = None) -> Tensor:
        """The UNet2DModel's output at timesteps ``timestep`` (B,); ``y`` only reaches a
        class-conditional model (training batches carry their dataset's labels either way)."""
        labels = y if self.unet.class_embedding is not None else None
        return self.unet(z, timestep, class_labels=labels).sample

    def forward(self, z: Tensor, logsnr: Tensor, y: Tensor | None = None) -> Tensor:
        return self.at_timestep(z, self.schedule.timestep(logsnr), y)
