"""A diffusers folder before any tensor is read: where its files are, what its configs say, whether it fits.

A folder (local path or fsspec URL) holds either a pipeline (``unet/`` and ``scheduler/``, as
``DDPMPipeline.save_pretrained`` writes it) or a model (``config.json`` + weights) with
``scheduler_config.json`` next to it or in ``scheduler/``. Only a ``UNet2DModel`` with a positional
(continuous) time embedding and a discrete-time VP scheduler config (:mod:`pd_core.interop.schedulers`)
is accepted; its ``prediction_type`` is the parameterization (epsilon -> eps, v_prediction -> v,
sample -> x). Every read is bounded in size. No torch and no diffusers here, so ``pd run`` checks a
teacher folder before anything heavy loads (:func:`preflight`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import fsspec

from pd_core.config import Config, ConfigError
from pd_core.interop.bounds import (
    DiffusersImportError,
    check_scheduler_config,
    check_unet_config,
    guidance_problem,
    parse_json,
)
from pd_core.interop.schedulers import UnsupportedScheduler, check_scheduler_class, scheduler_notes

URI_PREFIX = "diffusers:"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"
MAX_JSON_BYTES = 1 << 20  # a config file is a few KB
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}  # diffusers -> our parameterization
SUPPORTED_TIME_EMBEDDINGS = ("positional",)  # fractional timesteps need a continuous embedding


def scheduler_parameterization(scheduler_config: dict) -> str:
    """eps / v / x from a scheduler config's prediction_type (diffusers' default epsilon)."""
    return PREDICTION_TYPES[scheduler_config.get("prediction_type", "epsilon")]


def scheduler_timesteps(scheduler_config: dict) -> int:
    """T from a scheduler config's num_train_timesteps (diffusers' default 1000)."""
    return int(scheduler_config.get("num_train_timesteps", 1000))


def is_diffusers_uri(uri: str | None) -> bool:
    """Whether ``uri`` names a diffusers folder (``diffusers:<folder or fsspec URL>``)."""
    return bool(uri) and uri.startswith(URI_PREFIX)


def diffusers_location(uri: str) -> str:
    """``diffusers:s3://bucket/model`` -> ``s3://bucket/model``."""
    if not is_diffusers_uri(uri) or not uri[len(URI_PREFIX):].strip():
        raise DiffusersImportError(f"{uri!r} is not a diffusers URI: write diffusers:<folder or fsspec URL>")
    return uri[len(URI_PREFIX):].rstrip("/")


def diffusers_prediction_type(parameterization: str) -> str:
    """Our parameterization as diffusers' ``prediction_type`` (eps -> epsilon, v -> v_prediction, x -> sample)."""
    inverse = {v: k for k, v in PREDICTION_TYPES.items()}
    if parameterization not in inverse:
        raise ValueError(f"parameterization {parameterization!r} has no diffusers prediction_type; "
                         f"diffusers models predict one of {', '.join(sorted(inverse))}")
    return inverse[parameterization]


class _Folder:
    """Bounded reads from one folder through fsspec; errors are DiffusersImportError lines naming the file."""

    def __init__(self, location: str, *, storage_options: dict | None):
        # a local path is kept absolute: the location is recorded in manifests and read again from elsewhere
        self.location = os.path.abspath(os.path.expanduser(location)) if "://" not in location else location
        try:
            local = self.location
            self.fs, self.root = fsspec.core.url_to_fs(local, **(storage_options or {}))
        except (ValueError, ImportError, OSError) as err:
            raise DiffusersImportError(f"{location}: cannot open this location ({err}); give a folder path or an "
                                       f"fsspec URL such as s3://bucket/model") from None

    def url(self, *names: str) -> str:
        return "/".join([self.location, *names])

    def path(self, *names: str) -> str:
        return "/".join([self.root.rstrip("/"), *names])

    def is_file(self, *names: str) -> bool:
        try:
            return bool(self.fs.isfile(self.path(*names)))
        except OSError:
            return False

    def read(self, *names: str, limit: int) -> bytes:
        path = self.path(*names)
        try:
            size = int(self.fs.size(path))
            if size > limit:
                raise DiffusersImportError(f"{self.url(*names)} is {size} bytes, more than the {limit} allowed for "
                                           f"this file; is it the right file?")
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise DiffusersImportError(f"{self.url(*names)} does not exist") from None
        except OSError as err:
            raise DiffusersImportError(f"{self.url(*names)} could not be read: {err}") from None

    def json(self, *names: str) -> dict:
        raw = self.read(*names, limit=MAX_JSON_BYTES)
        try:
            doc = parse_json(raw, source=self.url(*names))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DiffusersImportError(f"{self.url(*names)} is not valid JSON ({err}); re-save the model with "
                                       f"save_pretrained") from None
        if not isinstance(doc, dict):
            raise DiffusersImportError(f"{self.url(*names)} must hold a JSON object (a diffusers config)")
        return doc


def _public(config: dict) -> dict:
    """A diffusers config without its private keys (``_class_name``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _layout(folder: _Folder) -> tuple[str, str]:
    """(model subfolder, scheduler subfolder) of a pipeline or model folder ('' = the folder itself)."""
    if folder.is_file("unet", "config.json"):
        model_dir = "unet"
    elif folder.is_file("config.json"):
        model_dir = ""
    else:
        raise DiffusersImportError(f"{folder.location} holds neither unet/config.json (a pipeline folder) nor "
                                   f"config.json (a model folder); point diffusers: at the folder save_pretrained "
                                   f"wrote")
    for sched_dir in ("scheduler", model_dir, ""):
        if folder.is_file(*[p for p in (sched_dir, "scheduler_config.json") if p]):
            return model_dir, sched_dir
    raise DiffusersImportError(f"{folder.location} has no scheduler_config.json (looked in scheduler/ and next to "
                               f"the model): save the scheduler the model was trained with next to it "
                               f"(scheduler.save_pretrained(folder))")


def _check_unet_config(config: dict, *, source: str) -> dict:
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise DiffusersImportError(f"{source} describes a {name}; only UNet2DModel (unconditional or "
                                   f"class-conditional image models) can be imported")
    embedding = config.get("time_embedding_type", "positional")
    if embedding not in SUPPORTED_TIME_EMBEDDINGS:
        raise DiffusersImportError(f"{source}: time_embedding_type {embedding!r} is not supported (the network must "
                                   f"take fractional timesteps: {', '.join(SUPPORTED_TIME_EMBEDDINGS)})")
    check_unet_config(config, source=source)
    return _public(config)


def check_timesteps(*, steps: int, num_train_timesteps: int, source: str,
                    field: str = "distill.start_steps") -> None:
    """Refuse an N-step grid finer than the model's T training timesteps (N > T): t = 1/N would fall between
    the clean end and the first timestep, where the model was never trained. ``field`` names the setting."""
    if steps > num_train_timesteps:
        finest = 1 << (num_train_timesteps.bit_length() - 1)
        raise DiffusersImportError(f"{source} was trained on {num_train_timesteps} timesteps, fewer than the "
                                   f"{steps} sampling steps asked for ({field}): set {field} to at most "
                                   f"{num_train_timesteps} (a power of two for distillation, e.g. {finest})")


@dataclass(frozen=True)
class FolderConfigs:
    """The configs of a diffusers folder and where its files are."""

    folder: _Folder
    model_dir: str  # "unet" in a pipeline folder, "" in a model folder
    unet_config: dict  # UNet2DModel config, private keys removed
    scheduler_config: dict  # scheduler config, private keys removed
    scheduler_source: str  # URL of scheduler_config.json
    scheduler_class: str = "DDPMScheduler"  # the config's _class_name (one of schedulers.VP_SCHEDULERS)

    @property
    def parameterization(self) -> str:
        """eps / v / x from the scheduler's prediction_type."""
        return scheduler_parameterization(self.scheduler_config)

    @property
    def num_train_timesteps(self) -> int:
        """T as the scheduler config says (diffusers' default 1000)."""
        return scheduler_timesteps(self.scheduler_config)

    @property
    def scheduler_notes(self) -> tuple[str, ...]:
        """One line per scheduler setting that is not used, saying why (:func:`schedulers.scheduler_notes`)."""
        return scheduler_notes(self.scheduler_class, self.scheduler_config, source=self.scheduler_source)

    def weights_url(self) -> str:
        """URL of the safetensors weights."""
        return self.folder.url(*[p for p in (self.model_dir, WEIGHTS_NAME) if p])


def read_configs(uri: str, *, storage_options: dict | None = None) -> FolderConfigs:
    """Read and check a diffusers folder's configs (``diffusers:<folder>`` or the bare location).

    The weights must be a safetensors file: a pickled ``.bin`` is refused here and never opened.
    """
    location = diffusers_location(uri) if is_diffusers_uri(uri) else uri.rstrip("/")
    folder = _Folder(location, storage_options=storage_options)
    model_dir, sched_dir = _layout(folder)
    config_parts = [p for p in (model_dir, "config.json") if p]
    unet_config = _check_unet_config(folder.json(*config_parts), source=folder.url(*config_parts))
    sched_parts = [p for p in (sched_dir, "scheduler_config.json") if p]
    scheduler_source = folder.url(*sched_parts)
    raw_scheduler = folder.json(*sched_parts)
    try:
        scheduler_class = check_scheduler_class(raw_scheduler.get("_class_name"), source=scheduler_source)
    except UnsupportedScheduler as err:
        raise DiffusersImportError(str(err)) from None
    scheduler_config = _public(raw_scheduler)
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise DiffusersImportError(f"{scheduler_source}: prediction_type {prediction!r} is not one of "
                                   f"{', '.join(PREDICTION_TYPES)}")
    if scheduler_config.get("rescale_betas_zero_snr"):
        raise DiffusersImportError(f"{scheduler_source}: rescale_betas_zero_snr makes alpha_bar 0 at the last "
                                   f"timestep (infinite noise, log-SNR -inf), which DDIM from pure noise cannot "
                                   f"represent")
    check_scheduler_config(scheduler_config, source=scheduler_source)
    _check_weights_file(folder, model_dir)
    return FolderConfigs(folder=folder, model_dir=model_dir, unet_config=unet_config,
                         scheduler_config=scheduler_config, scheduler_source=scheduler_source,
                         scheduler_class=scheduler_class)


def _check_weights_file(folder: _Folder, model_dir: str) -> None:
    parts = [p for p in (model_dir,) if p]
    if folder.is_file(*parts, WEIGHTS_NAME):
        return
    if folder.is_file(*parts, PICKLE_NAME):
        raise DiffusersImportError(f"{folder.url(*parts, PICKLE_NAME)} is a pickle, which can run code when "
                                   f"loaded and is never opened here: re-save the model with "
                                   f"save_pretrained(folder, safe_serialization=True) to get {WEIGHTS_NAME}")
    if folder.is_file(*parts, f"{WEIGHTS_NAME}.index.json"):
        raise DiffusersImportError(f"{folder.url(*parts)} holds sharded weights; re-save the model with "
                                   f"save_pretrained(folder, max_shard_size='8GB') to get one {WEIGHTS_NAME}")
    raise DiffusersImportError(f"{folder.url(*parts, WEIGHTS_NAME)} does not exist; save the model with "
                               f"save_pretrained(folder)")


def preflight(cfg: Config) -> FolderConfigs:
    """Check ``pipeline.teacher_uri`` (a diffusers folder) against the config before a run starts.

    ConfigError (one line) when the folder cannot be imported, when ``distill.start_steps`` is
    finer than the model's timesteps, or when ``data.image_size`` is not the model's sample size.
    """
    uri = cfg.pipeline.teacher_uri or ""
    if (problem := guidance_problem(guidance_enabled=cfg.guidance.enabled, guidance_weights=cfg.eval.guidance_weights)):
        raise ConfigError(problem)
    try:
        configs = read_configs(uri, storage_options=dict(cfg.storage.storage_options))
        check_timesteps(steps=cfg.distill.start_steps, num_train_timesteps=configs.num_train_timesteps, source=uri)
    except DiffusersImportError as err:
        raise ConfigError(f"pipeline.teacher_uri: {err}") from None
    size = configs.unet_config["sample_size"]
    if size != cfg.data.image_size:
        raise ConfigError(f"data.image_size must be the imported model's sample_size {size}, got "
                          f"{cfg.data.image_size} (the model denoises {size}x{size} images)")
    return configs
