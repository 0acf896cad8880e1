"""The whole configuration: one field per section, and the checks that span sections.

Cross-section rules: ``data.image_size`` is divisible by 2^(len(model.ch_mult) - 1);
``model.attn_resolutions`` are resolutions of the U-Net (image_size / 2^level); at every attended
level (and the middle block) the channels ``model.ch * mult`` split into whole heads; a
``distill.student_parameterization`` that is not ``auto`` goes with ``diffusion.weighting`` (the
students' loss weighting). Label dropout, guided distillation and guidance weights > 0 in evaluation
need a class-conditional model; the last two need a null class that was trained
(teacher.label_dropout > 0) unless the teacher is imported.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from pd_core.config.base import _FieldProblem, _Section
from pd_core.config.limits import size_problem
from pd_core.config.services import PipelineConfig, RuntimeConfig, StorageConfig, TrackingConfig
from pd_core.config.training import (
    DataConfig,
    DiffusionConfig,
    DistillConfig,
    EvalConfig,
    GuidanceConfig,
    ModelConfig,
    TeacherConfig,
)
from pd_core.kinds import check_combination


class Config(_Section):
    """A whole pipeline's configuration; ``to_yaml`` of it is logged once per run."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The U-Net.")
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig, description="Parameterization and loss.")
    data: DataConfig = Field(description="The dataset.")
    teacher: TeacherConfig = Field(description="Teacher training.")
    distill: DistillConfig = Field(description="Distillation rounds.")
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig, description="Guided distillation (stage 1).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Checkpoint store.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Device and precision.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Run identity.")

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        rounds = len(self.distill.rounds())
        if self.pipeline.restart_from is not None and self.pipeline.restart_from > rounds:
            raise _FieldProblem("pipeline.restart_from", f"must be a round of this pipeline, 0 (the teacher) to "
                                                         f"{rounds}, got {self.pipeline.restart_from}")
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
        self._check_sizes()
        student = self.distill.student_parameterization
        if student != "auto":
            try:
                check_combination(parameterization=student, weighting=self.diffusion.weighting)
            except ValueError as exc:
                raise _FieldProblem("distill.student_parameterization",
                                    f"must not be '{student}' with diffusion.weighting "
                                    f"'{self.diffusion.weighting}': {exc}") from None
        self._check_guidance()
        self._check_nodes()
        return self

    def _check_sizes(self) -> None:
        batches = {"teacher.batch_size": self.teacher.batch_size, "distill.batch_size": self.distill.batch_size}
        if self.guidance.enabled:
            batches["guidance.batch_size"] = self.guidance.batch_size
        problem = size_problem(model=self.model, image_size=self.data.image_size, batches=batches)
        if problem is not None:
            raise _FieldProblem(*problem)

    def _check_nodes(self) -> None:
        nodes = self.runtime.nodes
        for name, batch in (("teacher.batch_size", self.teacher.batch_size),
                            ("distill.batch_size", self.distill.batch_size),
                            ("guidance.batch_size", self.guidance.batch_size)):
            if batch % nodes:
                raise _FieldProblem(name, f"must divide by runtime.nodes={nodes} (each process takes batch_size / "
                                          f"nodes examples), got {batch}")

    def _check_guidance(self) -> None:
        if self.data.name == "captions":  # a text-to-image teacher: prompts condition it, "" is its null prompt
            if not (self.pipeline.teacher_uri or "").startswith("diffusers:"):
                raise _FieldProblem("data.name", "'captions' needs a text-to-image teacher to encode it: set "
                                                 "pipeline.teacher_uri to diffusers:<Stable Diffusion-style folder>")
            if self.data.random_flip:
                raise _FieldProblem("data.random_flip", "must be false with data.name=captions: the rounds train on "
                                                        "encoded latents, and flipping a latent is not flipping its "
                                                        "image; got true")
            if self.eval.enabled and self.eval.features == "classifier" and not self.eval.class_names:
                raise _FieldProblem("eval.features", "'classifier' needs eval.class_names (the classes the captions "
                                                     "name) to train the classifier on image-caption data; set them, "
                                                     "or eval.features=inception")
            return
        conditional, dropout = self.model.class_conditional, self.teacher.label_dropout
        if dropout > 0 and not conditional:
            raise _FieldProblem("teacher.label_dropout", f"needs model.class_conditional=true (labels to drop), "
                                                         f"got {dropout}")
        null_trained = dropout > 0 or self.pipeline.teacher_uri is not None
        if self.guidance.enabled and not (conditional and null_trained):
            raise _FieldProblem("guidance.enabled", "needs model.class_conditional=true and teacher.label_dropout > 0 "
                                                    "(the null class of classifier-free guidance), got true")
        guided = [w for w in self.eval.guidance_weights if w > 0]
        if guided and not (conditional and null_trained):
            raise _FieldProblem("eval.guidance_weights", f"needs model.class_conditional=true and "
                                                         f"teacher.label_dropout > 0 for w > 0, got {guided[0]}")

