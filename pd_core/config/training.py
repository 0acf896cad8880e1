"""The sections that say what is trained and how it is measured: model, diffusion, data, teacher, distill,
guidance, eval.

Each is a frozen :class:`~pd_core.config.base._Section`; field validators raise ``ValueError``
("must ..., got ...") and model validators raise ``_FieldProblem`` at the field to blame.
Distillation halves the sampler's step count each round: start_steps -> start_steps/2 -> ... ->
final_steps, both powers of two.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pd_core.config.base import _FieldProblem, _is_power_of_two, _no_credentials_in_url, _Section
from pd_core.config.limits import (
    MAX_BATCH,
    MAX_CHANNELS,
    MAX_IMAGE_SIZE,
    MAX_LEVELS,
    MAX_MULT,
    MAX_RES_BLOCKS,
    MAX_STEPS,
    MAX_UPDATES,
)
from pd_core.kinds import check_combination

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ModelConfig(_Section):
    """The U-Net (pd_core.unet.UNetSpec) sized for a dataset."""

    ch: int = Field(64, ge=1, le=MAX_CHANNELS, description="Base channel count of the U-Net.")
    emb_ch: int | None = Field(None, ge=1, le=4 * MAX_CHANNELS, description="Time-embedding width; None means 4 * ch.")
    ch_mult: tuple[int, ...] = Field((1, 2, 2), min_length=1, max_length=MAX_LEVELS,
                                     description="Channel multiplier per resolution level; each level after the "
                                                 "first halves the resolution.")
    num_res_blocks: int = Field(2, ge=1, le=MAX_RES_BLOCKS,
                                description="Res blocks per level on the way down (one more on the way up).")
    attn_resolutions: tuple[int, ...] = Field((), description="Resolutions (H) whose res blocks get self-attention; "
                                                              "the middle block always has attention.")
    num_heads: int = Field(1, ge=1, le=MAX_CHANNELS, description="Attention heads (ignored when head_dim is set).")
    head_dim: int | None = Field(None, ge=1, le=MAX_CHANNELS,
                                 description="Channels per attention head; None uses num_heads.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout in res blocks while training the teacher.")
    resblock_resample: bool = Field(True, description="BigGAN-style up/down-sampling res blocks (else convs).")
    norm_groups: int = Field(32, ge=1, le=MAX_CHANNELS,
                             description="GroupNorm groups (reduced to a divisor of tiny channel counts).")
    class_conditional: bool = Field(False, description="Add a class embedding (needs labelled data).")

    @field_validator("ch_mult")
    @classmethod
    def _positive_mults(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 or m > MAX_MULT for m in value):
            raise ValueError(f"must be a list of integers from 1 to {MAX_MULT}, got {list(value)}")
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
    """What the network predicts and how the per-example loss is weighted."""

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


DatasetName = Literal["fashion_mnist", "mnist", "cifar10", "npz", "folder", "digits", "captions"]


class DataConfig(_Section):
    """Where the images come from and how they are shaped (pd_core.data)."""

    name: DatasetName = Field(description="Dataset kind: fashion_mnist, mnist (IDX files), cifar10 (binary "
                                          "version), npz, folder (class subfolders), digits (scikit-learn 8x8), "
                                          "captions (images + metadata.jsonl with file_name and text, Hugging "
                                          "Face's imagefolder; for a text-to-image teacher).")
    url: str | None = Field(None, description="Directory, file or fsspec URL of the data; None = the dataset's "
                                              "default location (fashion_mnist: /usr/share/datasets/fashion-mnist).")
    image_size: int = Field(ge=1, le=MAX_IMAGE_SIZE,
                            description="Images are padded (with black, -1) or integer-downsampled to this.")
    random_flip: bool = Field(False, description="Random horizontal flips in training batches (deterministic).")
    limit: int | None = Field(None, ge=1, le=MAX_UPDATES,
                              description="Use only the first N training examples; None = all.")
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
        return _no_credentials_in_url(value)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.name in ("npz", "folder", "captions") and self.url is None:
            what = {"npz": ".npz file or directory", "folder": "image folder",
                    "captions": "folder holding metadata.jsonl"}[self.name]
            raise _FieldProblem("url", f"is required for data.name '{self.name}' (a path or fsspec URL of the {what})")
        if self.name == "digits" and self.url is not None:
            raise _FieldProblem("url", "must be null for data.name 'digits' (the data ships with scikit-learn), "
                                       f"got {self.url!r}")
        if self.download and self.name not in ("fashion_mnist", "mnist", "cifar10"):
            raise _FieldProblem("download", f"must be false for data.name '{self.name}' (only fashion_mnist, "
                                            "mnist and cifar10 have official files to download)")
        return self


class TeacherConfig(_Section):
    """Training the many-step teacher (continuous time; its EMA weights are what distillation gets)."""

    updates: int = Field(ge=1, le=MAX_UPDATES, description="Optimizer updates.")
    batch_size: int = Field(ge=1, le=MAX_BATCH, description="Examples per update.")
    lr: float = Field(2e-4, gt=0.0, description="Peak AdamW learning rate (after warmup).")
    warmup_steps: int = Field(1000, ge=0, le=MAX_UPDATES, description="Linear learning-rate warmup updates.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Global grad-norm clip; null = off.")
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0, description="EMA decay of the weights handed to distillation.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    log_every: int = Field(100, ge=1, le=MAX_UPDATES, description="Updates between progress/metric reports.")
    checkpoint_every: int = Field(1000, ge=1, le=MAX_UPDATES,
                                  description="Updates between resumable in-run checkpoints.")
    seed: int = Field(0, ge=0, description="Seed for init, batches, noise and times.")
    label_dropout: float = Field(0.0, ge=0.0, lt=1.0,
                                 description="Probability that a training label is replaced by the null class "
                                             "(classifier-free guidance; needs model.class_conditional).")


class DistillConfig(_Section):
    """The chain of distillation rounds start_steps -> start_steps/2 -> ... -> final_steps."""

    start_steps: int = Field(description="Teacher's DDIM step count (power of two >= 2); the first student "
                                         "gets half of it.")
    final_steps: int = Field(1, description="Step count of the last student (power of two < start_steps).")
    updates_per_round: int = Field(ge=1, le=MAX_UPDATES, description="Optimizer updates in each round.")
    last_rounds_updates: int | None = Field(None, ge=1, le=MAX_UPDATES,
                                            description="Updates for the rounds ending at 2 and 1 "
                                                                    "steps (paper: 100k); null = updates_per_round.")
    fast: bool = Field(False, description="Cheaper schedule: every round uses updates // fast_factor.")
    fast_factor: int = Field(5, ge=1, le=MAX_UPDATES, description="Divisor of the updates when fast is true.")
    batch_size: int = Field(ge=1, le=MAX_BATCH, description="Examples per update.")
    lr: float = Field(gt=0.0, description="Initial learning rate, annealed linearly to 0 over each round.")
    grad_clip: float | None = Field(None, gt=0.0, description="Global grad-norm clip; null = off (paper).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Student dropout (paper: none).")
    student_parameterization: Literal["auto", "eps", "x", "v", "both"] = Field(
        "auto", description="What the students predict: eps, x, v or both; auto = the teacher's, except x for "
                            "an eps teacher (eps students break down at 1-2 steps). The loss weighting is "
                            "diffusion.weighting.")
    log_every: int = Field(100, ge=1, le=MAX_UPDATES, description="Updates between progress/metric reports.")
    checkpoint_every: int = Field(1000, ge=1, le=MAX_UPDATES,
                                  description="Updates between resumable in-round checkpoints.")
    seed: int = Field(0, ge=0, description="Seed for batches, times and noise (round index is mixed in).")

    @field_validator("start_steps")
    @classmethod
    def _start_power_of_two(cls, value: int) -> int:
        if value < 2 or not _is_power_of_two(value):
            raise ValueError(f"must be a power of two >= 2, got {value}")
        if value > MAX_STEPS:
            raise ValueError(f"must be at most {MAX_STEPS} (a power of two), got {value}")
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


MAX_GUIDANCE_WEIGHT = 100.0
MAX_EVAL_WEIGHTS = 16


class GuidanceConfig(_Section):
    """Guided distillation, stage 1 (pd_core.guidance): a student that takes w learns the guided teacher.

    When enabled, the pipeline runs ``guide-distill`` after the teacher; the rounds then distil that
    student (stage 2), with w ~ U[w_min, w_max] and the class label as inputs.
    """

    enabled: bool = Field(False, description="Distil the guided teacher (needs model.class_conditional and "
                                             "teacher.label_dropout > 0, or an imported teacher with a null class).")
    w_min: float = Field(0.0, ge=0.0, le=MAX_GUIDANCE_WEIGHT, description="Smallest guidance weight trained.")
    w_max: float = Field(4.0, ge=0.0, le=MAX_GUIDANCE_WEIGHT, description="Largest guidance weight trained.")
    updates: int = Field(1000, ge=1, le=MAX_UPDATES, description="Optimizer updates of stage 1.")
    batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="Examples per update.")
    lr: float = Field(1e-4, gt=0.0, description="Initial learning rate, annealed linearly to 0 over stage 1.")
    embedding_lr_scale: float = Field(10.0, gt=0.0, le=1000.0,
                                      description="Learning-rate multiplier of the new guidance (w) embedding, "
                                                  "whose last layer starts at zero; the rest starts as the teacher.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Global grad-norm clip; null = off. The guided "
                                     "target's eps-space error is heavy-tailed at high SNR: unclipped, single "
                                     "batches undo the teacher's weights.")
    log_every: int = Field(100, ge=1, le=MAX_UPDATES, description="Updates between progress/metric reports.")
    checkpoint_every: int = Field(1000, ge=1, le=MAX_UPDATES,
                                  description="Updates between resumable in-run checkpoints.")

    @model_validator(mode="after")
    def _check(self) -> GuidanceConfig:
        if self.w_min > self.w_max:
            raise _FieldProblem("w_max", f"must be >= guidance.w_min ({self.w_min}), got {self.w_max}")
        return self


class EvalConfig(_Section):
    """Sample quality after each round (FD in classifier or Inception features, KID)."""

    enabled: bool = Field(True, description="Evaluate the teacher and every student.")
    num_samples: int = Field(10000, ge=2, le=MAX_UPDATES,
                             description="Generated (and reference) images per evaluation.")
    batch_size: int = Field(500, ge=1, le=MAX_BATCH, description="Sampling / feature batch size.")
    compile: bool = Field(False, description="torch.compile the sampler's network (static shapes; needs a C++ "
                                             "compiler on CPU). Samples run under runtime.precision either way.")
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
    kid_subsets: int = Field(100, ge=1, le=100_000, description="Random subsets averaged for KID.")
    kid_subset_size: int = Field(1000, ge=2, description="Images per KID subset (<= num_samples).")
    classifier_epochs: int = Field(5, ge=1, description="Epochs of the feature classifier (features=classifier).")
    teacher_extra_steps: list[int] = Field(default_factory=list,
                                           description="Extra teacher DDIM step counts for the quality table.")
    grid_size: int = Field(8, ge=0, description="Sample grid of n x n images per model; 0 = none.")
    class_names: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        None, min_length=1, max_length=1000,
        description="Text-to-image pipelines: the classes the prompts name (prompt_template of each); evaluation "
                    "prompts are class-balanced, prompt_accuracy is measured and the feature classifier learns the "
                    "captions that name a class. None: the data's distinct non-empty captions in turn.")
    prompt_template: str = Field("a photo of a {}", min_length=3, max_length=200,
                                 description="Text-to-image pipelines: the caption of a class (its name in {}).")
    guidance_weights: list[float] = Field(default_factory=lambda: [0.0], min_length=1, max_length=MAX_EVAL_WEIGHTS,
                                          description="Guidance weights w at which class-conditional models are "
                                                      "evaluated, on class-balanced labels (w = 0: the conditional "
                                                      "model; w > 0 needs a null class).")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, value: str) -> str:
        if value.count("{}") != 1 or value.replace("{}", "").count("{") or value.replace("{}", "").count("}"):
            raise ValueError(f"must hold exactly one {{}} where the class name goes, got {value!r}")
        return value

    @field_validator("inception_weights")
    @classmethod
    def _weights_url(cls, value: str | None) -> str | None:
        return _no_credentials_in_url(value)

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

    @field_validator("guidance_weights")
    @classmethod
    def _weights(cls, value: list[float]) -> list[float]:
        bad = [w for w in value if not 0.0 <= w <= MAX_GUIDANCE_WEIGHT]
        if bad:
            raise ValueError(f"must be guidance weights in [0, {MAX_GUIDANCE_WEIGHT:g}], got {bad[0]}")
        if len(set(value)) != len(value):
            raise ValueError(f"must not repeat a weight, got {value}")
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

