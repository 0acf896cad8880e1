"""Configuration: pydantic models (one per concern), named presets, overrides, hashing.

A run's configuration is built in three layers, each deep-merged over the previous one:
a named preset (``pd_core/presets/<name>.yaml``), an optional YAML file (path or fsspec URL),
then dotted ``key=value`` overrides (``distill.lr=1e-4``; values are parsed as YAML).
Every problem becomes a :class:`ConfigError` whose message is ONE line that names the dotted
field path and says what would be accepted, e.g.
``distill.start_steps must be a power of two >= 2, got 6``.

Models are frozen: a validated config is a value (it is hashed into checkpoint manifests);
derive a changed one with ``cfg.model_copy(update=...)`` or through :func:`load_config`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pd_core.kinds import check_combination

# Substrings of storage option names that carry credentials; such values belong in the
# environment (AWS_ACCESS_KEY_ID, ...) or in fsspec's own config, never in a logged config.
SECRET_KEY_PARTS = ("key", "secret", "token", "password", "passwd", "credential")
# URL userinfo with a password ("scheme://user:pass@host") leaks credentials the same way.
_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")
_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_][A-Za-z0-9_-]*)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the dotted field and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever went in


class _FieldProblem(ValueError):
    """Raised inside model validators so the error is reported at ``field`` (dotted, relative to the model)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------------------------
# Small shared checks (each returns the value or raises ValueError with "must ..., got ...")
# --------------------------------------------------------------------------------------------

def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _no_password_in_url(value: str | None) -> str | None:
    if value is not None and _URL_PASSWORD.match(value):
        raise ValueError("must not contain a password (user:password@...); pass credentials through "
                         "environment variables (e.g. AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_PASSWORD) instead")
    return value


def _secret_option_paths(options: Mapping[Any, Any], prefix: str = "") -> list[str]:
    """Dotted names of (nested) option keys that look like credentials."""
    found = []
    for key, value in options.items():
        name = f"{prefix}{key}"
        if any(part in str(key).lower() for part in SECRET_KEY_PARTS):
            found.append(name)
        if isinstance(value, Mapping):
            found.extend(_secret_option_paths(value, prefix=f"{name}."))
    return found


class _Section(BaseModel):
    """Base of every config section: unknown keys refused, no NaN/inf, immutable once validated."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

class ModelConfig(_Section):
    """The U-Net (pd_core.unet.UNetSpec) sized for a dataset."""

    ch: int = Field(64, ge=1, description="Base channel count of the U-Net.")
    emb_ch: int | None = Field(None, ge=1, description="Time-embedding width; None means 4 * ch.")
    ch_mult: tuple[int, ...] = Field((1, 2, 2), min_length=1,
                                     description="Channel multiplier per resolution level; each level after the "
                                                 "first halves the resolution.")
    num_res_blocks: int = Field(2, ge=1, description="Res blocks per level on the way down (one more on the way up).")
    attn_resolutions: tuple[int, ...] = Field((), description="Resolutions (H) whose res blocks get self-attention; "
                                                              "the middle block always has attention.")
    num_heads: int = Field(1, ge=1, description="Attention heads (ignored when head_dim is set).")
    head_dim: int | None = Field(None, ge=1, description="Channels per attention head; None uses num_heads.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout in res blocks while training the teacher.")
    resblock_resample: bool = Field(True, description="BigGAN-style up/down-sampling res blocks (else convs).")
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups (reduced to a divisor of tiny channel counts).")
    class_conditional: bool = Field(False, description="Add a class embedding (needs labelled data).")

    @field_validator("ch_mult")
    @classmethod
    def _positive_mults(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 for m in value):
            raise ValueError(f"must be a list of integers >= 1, got {list(value)}")
        return value

    @field_validator("attn_resolutions")
    @classmethod
    def _positive_resolutions(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(r < 1 for r in value):
            raise ValueError(f"must be a list of resolutions >= 1, got {list(value)}")
        return value

    @property
    def resolved_emb_ch(self) -> int:
        """The time-embedding width actually used (emb_ch, or 4 * ch)."""
        return self.emb_ch if self.emb_ch is not None else 4 * self.ch


class DiffusionConfig(_Section):
    """What the network predicts and how the per-example loss is weighted (DESIGN.md section 2)."""

    parameterization: Literal["eps", "x", "v", "both"] = Field(
        "x", description="Network output: eps, x, v, or both (2C channels: x then eps).")
    weighting: Literal["constant", "snr", "snr_trunc", "snr_plus_one"] = Field(
        "snr_trunc", description="Loss weighting over the x-error; snr_trunc = max(SNR, 1).")
    logsnr_min: float = Field(-20.0, description="lambda at t = 1 of the truncated cosine schedule.")
    logsnr_max: float = Field(20.0, description="lambda at t = 0 of the truncated cosine schedule.")

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        if self.logsnr_min >= self.logsnr_max:
            raise _FieldProblem("logsnr_min", f"must be smaller than diffusion.logsnr_max ({self.logsnr_max}), "
                                              f"got {self.logsnr_min}")
        try:
            check_combination(parameterization=self.parameterization, weighting=self.weighting)
        except ValueError as exc:
            raise _FieldProblem("weighting", f"must not be '{self.weighting}' with diffusion.parameterization "
                                             f"'{self.parameterization}': {exc}") from None
        return self


DatasetName = Literal["fashion_mnist", "mnist", "cifar10", "npz", "folder", "digits"]


class DataConfig(_Section):
    """Where the images come from and how they are shaped (pd_core.data)."""

    name: DatasetName = Field(description="Dataset kind: fashion_mnist, mnist (IDX files), cifar10 (binary "
                                          "version), npz, folder (class subfolders), digits (scikit-learn 8x8).")
    url: str | None = Field(None, description="Directory, file or fsspec URL of the data; None = the dataset's "
                                              "default location (fashion_mnist: /usr/share/datasets/fashion-mnist).")
    image_size: int = Field(ge=1, description="Images are padded (with black, -1) or integer-downsampled to this.")
    random_flip: bool = Field(False, description="Random horizontal flips in training batches (deterministic).")
    limit: int | None = Field(None, ge=1, description="Use only the first N training examples; None = all.")
    download: bool = Field(False, description="Fetch the official files (sha256-checked) when they are missing; "
                                              "never happens unless true.")
    download_dir: str = Field(".pd/datasets", description="Where downloads go when data.url is None "
                                                          "(<download_dir>/<name>); path or fsspec URL.")
    mirror: str | None = Field(None, description="Base URL to download the official file names from instead "
                                                 "of the official host (e.g. an internal mirror); "
                                                 "the pinned sha256 values still apply.")

    @field_validator("url", "mirror", "download_dir")
    @classmethod
    def _url_ok(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a non-empty path or URL, got ''")
        return _no_password_in_url(value)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.name in ("npz", "folder") and self.url is None:
            raise _FieldProblem("url", f"is required for data.name '{self.name}' (a path or fsspec URL of the "
                                       f"{'.npz file or directory' if self.name == 'npz' else 'image folder'})")
        if self.name == "digits" and self.url is not None:
            raise _FieldProblem("url", "must be null for data.name 'digits' (the data ships with scikit-learn), "
                                       f"got {self.url!r}")
        if self.download and self.name not in ("fashion_mnist", "mnist", "cifar10"):
            raise _FieldProblem("download", f"must be false for data.name '{self.name}' (only fashion_mnist, "
                                            "mnist and cifar10 have official files to download)")
        return self


class TeacherConfig(_Section):
    """Training the many-step teacher (continuous time; its EMA weights are what distillation gets)."""

    updates: int = Field(ge=1, description="Optimizer updates.")
    batch_size: int = Field(ge=1, description="Examples per update.")
    lr: float = Field(2e-4, gt=0.0, description="Peak AdamW learning rate (after warmup).")
    warmup_steps: int = Field(1000, ge=0, description="Linear learning-rate warmup updates.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Global grad-norm clip; null = off.")
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0, description="EMA decay of the weights handed to distillation.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    log_every: int = Field(100, ge=1, description="Updates between progress/metric reports.")
    checkpoint_every: int = Field(1000, ge=1, description="Updates between resumable in-run checkpoints.")
    seed: int = Field(0, ge=0, description="Seed for init, batches, noise and times.")


class DistillConfig(_Section):
    """The chain of distillation rounds start_steps -> start_steps/2 -> ... -> final_steps."""

    start_steps: int = Field(description="Teacher's DDIM step count (power of two >= 2); the first student "
                                         "gets half of it.")
    final_steps: int = Field(1, description="Step count of the last student (power of two < start_steps).")
    updates_per_round: int = Field(ge=1, description="Optimizer updates in each round.")
    last_rounds_updates: int | None = Field(None, ge=1, description="Updates for the rounds ending at 2 and 1 "
                                                                    "steps (paper: 100k); null = updates_per_round.")
    fast: bool = Field(False, description="Cheaper schedule: every round uses updates // fast_factor.")
    fast_factor: int = Field(5, ge=1, description="Divisor of the updates when fast is true.")
    batch_size: int = Field(ge=1, description="Examples per update.")
    lr: float = Field(gt=0.0, description="Initial learning rate, annealed linearly to 0 over each round.")
    grad_clip: float | None = Field(None, gt=0.0, description="Global grad-norm clip; null = off (paper).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Student dropout (paper: none).")
    log_every: int = Field(100, ge=1, description="Updates between progress/metric reports.")
    checkpoint_every: int = Field(1000, ge=1, description="Updates between resumable in-round checkpoints.")
    seed: int = Field(0, ge=0, description="Seed for batches, times and noise (round index is mixed in).")

    @field_validator("start_steps")
    @classmethod
    def _start_power_of_two(cls, value: int) -> int:
        if value < 2 or not _is_power_of_two(value):
            raise ValueError(f"must be a power of two >= 2, got {value}")
        return value

    @field_validator("final_steps")
    @classmethod
    def _final_power_of_two(cls, value: int) -> int:
        if not _is_power_of_two(value):
            raise ValueError(f"must be a power of two >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.final_steps >= self.start_steps:
            raise _FieldProblem("final_steps", f"must be smaller than distill.start_steps ({self.start_steps}), "
                                               f"got {self.final_steps}")
        return self

    def rounds(self) -> list[tuple[int, int]]:
        """[(teacher_steps, student_steps), ...] from start_steps down to final_steps."""
        out, teacher = [], self.start_steps
        while teacher > self.final_steps:
            out.append((teacher, teacher // 2))
            teacher //= 2
        return out

    def updates_for(self, student_steps: int) -> int:
        """Optimizer updates of the round whose student samples in ``student_steps`` steps."""
        if student_steps not in [s for _, s in self.rounds()]:
            raise ValueError(f"student_steps must be one of the rounds' student step counts "
                             f"{[s for _, s in self.rounds()]}, got {student_steps}")
        base = self.updates_per_round
        if student_steps <= 2 and self.last_rounds_updates is not None:
            base = self.last_rounds_updates  # paper: more updates for the two hardest rounds
        return max(1, base // self.fast_factor) if self.fast else base


class EvalConfig(_Section):
    """Sample quality after each round (FD in classifier or Inception features, KID)."""

    enabled: bool = Field(True, description="Evaluate the teacher and every student.")
    num_samples: int = Field(10000, ge=2, description="Generated (and reference) images per evaluation.")
    batch_size: int = Field(500, ge=1, description="Sampling / feature batch size.")
    seed: int = Field(0, ge=0, description="Seed of the sampling noise: the same for every compared model.")
    features: Literal["classifier", "inception"] = Field(
        "classifier", description="classifier: a small net trained on the dataset (offline, reported as "
                                  "fd_<dataset>); inception: TF-Inception pool3 (standard FID; needs weights).")
    inception_weights: str | None = Field(None, description="Path or fsspec URL of the pt_inception weights; "
                                                            "never downloaded implicitly.")
    inception_sha256: str | None = Field(None, description="Expected sha256 (hex) of inception_weights.")
    stochastic_gammas: list[float] = Field(default_factory=lambda: [0.0, 0.3, 0.7, 1.0],
                                           description="Evaluate the teacher's ancestral sampler with these variance "
                                                       "interpolation coefficients (each in [0, 1]); the table keeps "
                                                       "the best per step count, as the paper tunes it. [] = skip.")
    kid_subsets: int = Field(100, ge=1, description="Random subsets averaged for KID.")
    kid_subset_size: int = Field(1000, ge=2, description="Images per KID subset (<= num_samples).")
    classifier_epochs: int = Field(5, ge=1, description="Epochs of the feature classifier (features=classifier).")
    teacher_extra_steps: list[int] = Field(default_factory=list,
                                           description="Extra teacher DDIM step counts for the quality table.")
    grid_size: int = Field(8, ge=0, description="Sample grid of n x n images per model; 0 = none.")

    @field_validator("inception_weights")
    @classmethod
    def _weights_url(cls, value: str | None) -> str | None:
        return _no_password_in_url(value)

    @field_validator("inception_sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value.lower()):
            raise ValueError(f"must be 64 hex digits (a sha256), got {value!r}")
        return value.lower() if value is not None else None

    @field_validator("stochastic_gammas")
    @classmethod
    def _gammas(cls, value: list[float]) -> list[float]:
        bad = [g for g in value if not 0.0 <= g <= 1.0]
        if bad:
            raise ValueError(f"must be coefficients in [0, 1], got {bad[0]}")
        return value

    @field_validator("teacher_extra_steps")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if s < 1]
        if bad:
            raise ValueError(f"must be step counts >= 1, got {bad[0]}")
        return value

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.kid_subset_size > self.num_samples:
            raise _FieldProblem("kid_subset_size", f"must be <= eval.num_samples ({self.num_samples}), "
                                                   f"got {self.kid_subset_size}")
        if self.enabled and self.features == "inception" and self.inception_weights is None:
            raise _FieldProblem("inception_weights", "is required when eval.features is 'inception': give the path "
                                                     "or URL of the pt_inception weights (they are never "
                                                     "downloaded), or use eval.features=classifier")
        return self


class StorageConfig(_Section):
    """The checkpoint store (pd_core.store) over fsspec."""

    root: str = Field(".pd/store", description="Path or fsspec URL (file://, s3://, memory://) of the store.")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="fsspec options such as endpoint_url or "
                                                        "client_kwargs; never credentials (use env vars).")

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty path or URL, got ''")
        return _no_password_in_url(value)  # type: ignore[return-value]

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        secret = _secret_option_paths(value)
        if secret:
            raise ValueError(f"must not contain credentials (found {', '.join(secret)}); set them as environment "
                             "variables such as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or in fsspec's config, "
                             "so they are never logged or hashed")
        return value


class TrackingConfig(_Section):
    """MLflow tracking (used by tasks/, never by pd_core)."""

    enabled: bool = Field(True, description="Log runs, params, metrics and artifacts to MLflow.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; null = sqlite:///.pd/mlflow.db.")
    experiment: str = Field("progressive-distillation", min_length=1, description="MLflow experiment name.")
    registered_model: str | None = Field(None, description="Register the final student under this name; "
                                                           "null = do not register.")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return _no_password_in_url(value)


class RuntimeConfig(_Section):
    """Where and how the computation runs."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision; auto: bf16 on GPU, fp32 on CPU.")
    channels_last: bool | None = Field(None, description="channels_last memory format; null = on GPU only.")
    compile: bool = Field(False, description="torch.compile the networks.")
    nproc: int = Field(1, ge=1, description="Processes (GPUs) per training job.")
    num_workers: int = Field(0, ge=0, description="Data-loading worker processes.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; null = torch's default.")


class PipelineConfig(_Section):
    """Identity of a pipeline run (names the store namespace and the MLflow parent run)."""

    name: str = Field("default", description="Pipeline name: letters, digits, '.', '_', '-' (used in store keys).")
    seed: int = Field(0, ge=0, description="Pipeline-level seed (mixed into task seeds).")
    teacher_uri: str | None = Field(None, description="Import this teacher checkpoint (store key or URL) instead "
                                                      "of training one.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _PIPELINE_NAME.match(value) or ".." in value:
            raise ValueError("must be 1-100 letters, digits, '.', '_' or '-' starting with a letter or digit "
                             f"(it becomes part of storage keys), got {value!r}")
        return value

    @field_validator("teacher_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return _no_password_in_url(value)


class Config(_Section):
    """A whole pipeline's configuration; ``to_yaml`` of it is logged once per run."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The U-Net.")
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig, description="Parameterization and loss.")
    data: DataConfig = Field(description="The dataset.")
    teacher: TeacherConfig = Field(description="Teacher training.")
    distill: DistillConfig = Field(description="Distillation rounds.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Checkpoint store.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Device and precision.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Run identity.")

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        m, size = self.model, self.data.image_size
        factor = 2 ** (len(m.ch_mult) - 1)
        if size % factor:
            raise _FieldProblem("data.image_size", f"must be divisible by 2^(len(model.ch_mult)-1) = {factor} for "
                                                   f"model.ch_mult={list(m.ch_mult)}, got {size}")
        resolutions = [size // 2 ** level for level in range(len(m.ch_mult))]
        missing = [r for r in m.attn_resolutions if r not in resolutions]
        if missing:
            raise _FieldProblem("model.attn_resolutions", f"must be resolutions of this U-Net {resolutions} "
                                                          f"(image_size {size}), got {missing[0]}")
        for level, mult in enumerate(m.ch_mult):
            attended = resolutions[level] in m.attn_resolutions or level == len(m.ch_mult) - 1  # last: middle block
            channels = m.ch * mult
            heads = channels // m.head_dim if m.head_dim else m.num_heads
            if attended and (heads < 1 or channels % heads):
                name, value = ("model.head_dim", m.head_dim) if m.head_dim else ("model.num_heads", m.num_heads)
                raise _FieldProblem(name, f"must split the {channels} attention channels (model.ch * ch_mult at "
                                          f"an attended level) into whole heads, got {value}")
        return self


# --------------------------------------------------------------------------------------------
# Validation errors -> one-line ConfigError
# --------------------------------------------------------------------------------------------

def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _section_model(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``loc`` (None if loc leaves the model tree)."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _required_fields(model: type[BaseModel], prefix: str) -> list[str]:
    return [f"{prefix}.{name}" for name, f in model.model_fields.items() if f.is_required()]


def _explain(error: Mapping[str, Any]) -> str:
    """One pydantic error -> 'dotted.path must ..., got ...'."""
    loc = list(error.get("loc", ()))
    ctx = error.get("ctx") or {}
    original = ctx.get("error")
    if isinstance(original, _FieldProblem):
        loc = loc + original.field.split(".")
    path = _dotted(loc) or "the configuration"
    kind = error.get("type", "")
    got = f", got {_short_repr(error.get('input'))}"

    if isinstance(original, ValueError):
        return f"{path} {original}"
    if kind == "extra_forbidden":
        holder = _section_model(loc)
        names = list(holder.model_fields) if holder else []
        guess = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6) if names else []
        hint = f" (did you mean {_dotted(loc[:-1] + guess)}?)" if guess else (
            f" (known: {', '.join(names)})" if names else "")
        return f"unknown field {path}{hint}"
    if kind == "missing":
        holder = _section_model(loc)
        field = holder.model_fields.get(str(loc[-1])) if holder else None
        annotation = field.annotation if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            required = ", ".join(_required_fields(annotation, path))
            return f"section {path} is missing: set {required} (or start from a preset such as smoke)"
        return f"{path} is required; set it in the YAML file or with --set {path}=VALUE"
    if kind in ("int_type", "int_parsing", "int_from_float", "int_parsing_size"):
        return f"{path} must be an integer{got}"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"{path} must be a finite number{got}"
    if kind in ("bool_type", "bool_parsing"):
        return f"{path} must be true or false{got}"
    if kind in ("string_type", "string_unicode"):
        return f"{path} must be a string{got}"
    if kind == "literal_error":
        return f"{path} must be one of {ctx.get('expected', '?')}{got}"
    if kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(v for k, v in ctx.items() if k in ("ge", "gt", "lt", "le")), "?")
        return f"{path} must be {op} {bound}{got}"
    if kind in ("tuple_type", "list_type", "iterable_type"):
        return f"{path} must be a list{got}"
    if kind == "too_short":
        return f"{path} must have at least {ctx.get('min_length', 1)} item(s){got}"
    if kind == "too_long":
        return f"{path} must have at most {ctx.get('max_length', '?')} characters/items{got}"
    if kind in ("dict_type", "model_type", "model_attributes_type", "mapping_type"):
        return f"{path} must be a mapping of fields{got}"
    message = str(error.get("msg", "is invalid"))
    return f"{path} {message[:1].lower()}{message[1:]}{got}"


def _config_error(exc: ValidationError) -> ConfigError:
    errors = exc.errors()
    messages = list(dict.fromkeys(_explain(e) for e in errors))  # de-duplicate, keep order
    text = "; ".join(messages[:3])
    if len(messages) > 3:
        text += f" (and {len(messages) - 3} more)"
    return ConfigError(text)


def validate_config(data: Mapping[str, Any]) -> Config:
    """Validate a plain mapping (e.g. a manifest's stored config) into a Config, or raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"the configuration must be a mapping of sections (model, data, ...), "
                          f"got {type(data).__name__}")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise _config_error(exc) from None
    except (TypeError, OverflowError, RecursionError) as exc:  # exotic YAML values pydantic does not wrap
        raise ConfigError(f"the configuration could not be validated: {exc}") from None


# --------------------------------------------------------------------------------------------
# YAML, presets, overrides
# --------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 (no dot) as a float, like YAML 1.2 and like users expect."""

    # copy the resolver table (lists included) so SafeLoader itself is left untouched
    yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, *, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source} is not valid YAML{at}: {problem}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None


def _read_yaml_mapping(text: str, *, source: str) -> dict[str, Any]:
    data = _parse_yaml(text, source=source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must contain a mapping of sections (model:, data:, ...), "
                          f"got {type(data).__name__}")
    return data


def _preset_files() -> dict[str, Any]:
    folder = resources.files("pd_core") / "presets"
    return {f.name[:-5]: f for f in folder.iterdir() if f.name.endswith(".yaml")}


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description (the first comment line of its YAML)."""
    out = {}
    for name, file in sorted(_preset_files().items()):
        first = file.read_text(encoding="utf-8").lstrip().splitlines()[:1]
        out[name] = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
    return out


def preset_yaml(name: str) -> str:
    """The raw YAML text of a preset (for display); ConfigError for an unknown name."""
    files = _preset_files()
    if name not in files:
        guess = difflib.get_close_matches(name, list(files), n=1, cutoff=0.5)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(sorted(files))}")
    return files[name].read_text(encoding="utf-8")


def parse_override(item: str) -> tuple[str, Any]:
    """``"distill.lr=1e-4"`` -> ``("distill.lr", 0.0001)``; the value is parsed as YAML (lists, null, ...)."""
    example = "expected KEY=VALUE with a dotted KEY, e.g. distill.lr=1e-4 or model.ch_mult=[1,2,2]"
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {_short_repr(item)} is malformed: {example}")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not _OVERRIDE_KEY.match(key):
        raise ConfigError(f"override {_short_repr(item)} is malformed: key {_short_repr(key)} is not a dotted "
                          f"field name; {example}")
    value = _parse_yaml(raw, source=f"the value of override {key}")
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree[a][b][c] = value for key 'a.b.c', creating sections as needed."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[:depth + 1])} is a value "
                              f"({_short_repr(child)}), not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(dict(base))  # callers may mutate the result (overrides) without touching base
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_text(path: str) -> str:
    """Text of a local path or any fsspec URL."""
    local = os.path.expanduser(path) if "://" not in path else path
    try:
        with fsspec.open(local, "rt", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; give an existing YAML path or URL") from None
    except (OSError, UnicodeDecodeError, ValueError, ImportError) as exc:
        raise ConfigError(f"config file {path} could not be read: {exc}") from None


def load_config(*, preset: str | None = None, path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Preset YAML, then the file's YAML deep-merged over it, then ``key=value`` overrides; validated."""
    tree: dict[str, Any] = {}
    if preset is not None:
        tree = _read_yaml_mapping(preset_yaml(preset), source=f"preset {preset}")
    if path is not None:
        tree = deep_merge(tree, _read_yaml_mapping(_read_text(path), source=f"config file {path}"))
    if isinstance(overrides, str):  # a lone string would be split into characters
        overrides = [overrides]
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return validate_config(tree)


# --------------------------------------------------------------------------------------------
# Views of a validated config
# --------------------------------------------------------------------------------------------

def config_hash(cfg: Config, *, sections: Iterable[str] | None = None) -> str:
    """sha256 hex of the canonical JSON (sorted keys) of ``cfg``, or of only the named sections.

    ``sections`` lets a caller hash what determines a result (e.g. model, diffusion, data, distill)
    without tracking/runtime settings that may differ between an original run and its resume.
    """
    dump = cfg.model_dump(mode="json")
    if sections is not None:
        names = list(sections)
        unknown = [n for n in names if n not in dump]
        if unknown:
            raise ConfigError(f"config_hash sections must be among {', '.join(dump)}, got {unknown[0]!r}")
        dump = {n: dump[n] for n in names}
    canonical = json.dumps(dump, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _flat_value(value: Any) -> str | int | float | bool:
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)  # lists (and empty dicts): one readable param


def flatten(cfg: Config) -> dict[str, str | int | float | bool]:
    """Dotted keys -> scalar values (for MLflow params); lists as JSON, None as 'null'."""
    out: dict[str, str | int | float | bool] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                walk(value, f"{name}.")
            else:
                out[name] = _flat_value(value)

    walk(cfg.model_dump(mode="json"), "")
    return out


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (``load_config(path=...)`` of it gives back an equal Config)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=100)


def model_spec(cfg: Config, *, in_channels: int, num_classes: int = 0, dropout: float | None = None) -> Any:
    """The pd_core.unet.UNetSpec for this config and a dataset with ``in_channels`` channels.

    ``dropout`` defaults to the teacher's (model.dropout); pass cfg.distill.dropout for students.
    Output channels follow the parameterization (2C for ``both``).
    """
    from pd_core.parameterization import output_channels
    from pd_core.unet import UNetSpec

    m = cfg.model
    return UNetSpec(
        in_channels=in_channels,
        out_channels=output_channels(kind=cfg.diffusion.parameterization, channels=in_channels),
        image_size=cfg.data.image_size,
        ch=m.ch,
        emb_ch=m.resolved_emb_ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        dropout=m.dropout if dropout is None else dropout,
        resblock_resample=m.resblock_resample,
        num_classes=num_classes if m.class_conditional else 0,
        norm_groups=m.norm_groups,
    )


def field_descriptions(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> description, for help output (``pd config --explain``)."""
    out: dict[str, str] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(field_descriptions(annotation, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = field.description or ""
    return out


__all__ = [
    "Config", "ConfigError", "DataConfig", "DiffusionConfig", "DistillConfig", "EvalConfig", "ModelConfig",
    "PipelineConfig", "RuntimeConfig", "StorageConfig", "TeacherConfig", "TrackingConfig",
    "config_hash", "deep_merge", "field_descriptions", "flatten", "list_presets", "load_config", "model_spec",
    "parse_override", "preset_yaml", "to_yaml", "validate_config",
]
