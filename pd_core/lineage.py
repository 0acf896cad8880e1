"""Lineage: what decides a checkpoint's weights, and whether a stored checkpoint is the one this run would make.

Every checkpoint's manifest names its parent (``parent_sha256``: the teacher a student was distilled
from, the source checkpoint of an imported teacher, None for a teacher trained here) and
``settings_hash``, the sha256 of the canonical JSON of the settings that decide its weights, and
only those (kept next to it as ``settings``):

    teacher   model, diffusion, data, teacher (without log_every, checkpoint_every; label_dropout only
              when it is not 0), pipeline.seed
    stage 1   guided distillation's w-conditioned student (``guided_lineage``): diffusion, data, guidance
              (w_min, w_max, updates, batch_size, lr, grad_clip, embedding_lr_scale), distill.dropout, the
              student's resolved parameterization, pipeline.seed and the teacher's step count; its parent is the teacher
    round r   diffusion, data, the round's distill settings (batch_size, lr, grad_clip, dropout, the
              round's update count and the student's resolved parameterization), pipeline.seed, r and
              the round's step counts; for a round of a w-conditioned teacher (stage 2) also the guidance
              range w_min, w_max the round draws w from. Round 1's parent is the stage-1 student when
              guided distillation is on, else the teacher
    text      stage 1 and the rounds of a text-to-image pipeline also record ``encoded_data``, the sha256
              of the encoded latents and caption embeddings they train on (a changed data set or
              encoder is another lineage), and ``teacher_folder``, the folder's hash (its scheduler
              decides the schedule they train on; a checkpoint's sha256 covers its weights only, so a
              re-imported teacher of the same UNet keeps its sha256); its imported teacher's parent is
              the folder's hash

Every kind also records the data-parallel layout (``runtime.nproc`` and ``runtime.nodes``) when it is
not one process: the global batch is ``batch_size x nproc`` and each rank draws its own noise, so
the layout decides the weights (one process is hashed as if the field did not exist, so single-process
checkpoints keep their hashes).

Evaluation, storage, tracking and other runtime settings, log and checkpoint cadences, ``teacher.seed``
and ``distill.seed`` (the pipeline seed is what seeds the training) change no weights and are left
out, so changing distill.lr never invalidates the teacher. An in-round state carries the same
lineage, so a state of other settings or another parent is never resumed into.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pd_core.config import Config

# Fields that change when and how often progress is reported or saved, never the weights.
CADENCE_FIELDS = ("log_every", "checkpoint_every")
# Distill fields that decide a round's student (the round's update count comes from updates_for).
ROUND_DISTILL_FIELDS = ("batch_size", "lr", "grad_clip", "dropout")
# Guidance fields that decide the stage-1 student (``enabled`` is implied by there being one).
GUIDED_FIELDS = ("w_min", "w_max", "updates", "batch_size", "lr", "grad_clip", "embedding_lr_scale")
SHORT = 12  # hex digits of a hash or sha256 in messages


class PipelineMismatchError(ValueError):
    """A stored checkpoint is not what this run would make (other settings or another parent); not reused."""


@dataclass(frozen=True)
class Lineage:
    """What decides a checkpoint's weights: the settings (and their hash) and the parent's sha256."""

    settings: dict[str, Any]
    settings_hash: str
    parent_sha256: str | None

    def manifest_fields(self) -> dict[str, Any]:
        """The manifest (and in-round state meta) fields that record this lineage."""
        return {"settings_hash": self.settings_hash, "settings": self.settings, "parent_sha256": self.parent_sha256}


def settings_hash(settings: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON (sorted keys, no NaN) of ``settings``."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _processes(cfg: Config) -> dict[str, int] | None:
    """The data-parallel layout that decides the weights, or None for one process."""
    if cfg.runtime.nproc * cfg.runtime.nodes == 1:
        return None
    return {"nproc": cfg.runtime.nproc, "nodes": cfg.runtime.nodes}


def _lineage(settings: dict[str, Any], parent_sha256: str | None, cfg: Config) -> Lineage:
    processes = _processes(cfg)
    if processes is not None:
        settings = {**settings, "processes": processes}
    return Lineage(settings=settings, settings_hash=settings_hash(settings), parent_sha256=parent_sha256)


def teacher_lineage(cfg: Config, *, source_sha256: str | None = None) -> Lineage:
    """The teacher's lineage; ``source_sha256`` is the imported checkpoint's (its parent) or None when trained here."""
    dump = cfg.model_dump(mode="json")
    teacher = {k: v for k, v in dump["teacher"].items() if k not in CADENCE_FIELDS and k != "seed"}
    if not cfg.teacher.label_dropout:  # off: hashed as if the field did not exist (earlier teachers keep theirs)
        teacher.pop("label_dropout", None)
    settings = {"kind": "teacher", "model": dump["model"], "diffusion": dump["diffusion"], "data": dump["data"],
                "teacher": teacher, "pipeline_seed": cfg.pipeline.seed,
                "imported_from_sha256": source_sha256}
    return _lineage(settings, source_sha256, cfg)


def guided_lineage(cfg: Config, *, teacher_steps: int, parent_sha256: str,
                   student_parameterization: str | None = None, encoded_data: str | None = None,
                   teacher_folder: str | None = None) -> Lineage:
    """Guided distillation's stage-1 lineage: the w-conditioned student of the ``teacher_steps``-step teacher.

    Its weights are decided by the guidance section (the w range it learns, its updates and optimizer, the
    guidance embedding's learning-rate scale),
    the student's dropout (distill.dropout) and resolved parameterization (default: the diffusion's),
    the diffusion, the data and the pipeline seed; its parent is the teacher's sha256.
    """
    dump = cfg.model_dump(mode="json")
    guidance = {k: dump["guidance"][k] for k in GUIDED_FIELDS}
    settings = {"kind": "guided_student", "teacher_steps": teacher_steps, "diffusion": dump["diffusion"],
                "data": dump["data"], "guidance": guidance, "distill": {"dropout": dump["distill"]["dropout"]},
                "student_parameterization": student_parameterization or cfg.diffusion.parameterization,
                "pipeline_seed": cfg.pipeline.seed}
    return _lineage(_with_text(settings, encoded_data, teacher_folder), parent_sha256, cfg)


def round_lineage(cfg: Config, *, round_index: int, teacher_steps: int, parent_sha256: str,
                  student_parameterization: str | None = None,
                  guidance_range: tuple[float, float] | None = None, encoded_data: str | None = None,
                  teacher_folder: str | None = None) -> Lineage:
    """Round ``round_index``'s lineage: distilling the ``teacher_steps``-step parent into a student of half that.

    ``student_parameterization`` is what ``distill.student_parameterization`` resolved to for this teacher
    (``auto`` depends on the teacher, so the setting alone does not decide it); default: the diffusion's.
    ``guidance_range`` (w_min, w_max): the weights a round of a w-conditioned teacher draws (stage 2);
    None (no such field in the settings) for other rounds.
    """
    dump = cfg.model_dump(mode="json")
    student_steps = teacher_steps // 2
    distill = {k: dump["distill"][k] for k in ROUND_DISTILL_FIELDS}
    distill["updates"] = cfg.distill.updates_for(student_steps)
    distill["student_parameterization"] = student_parameterization or cfg.diffusion.parameterization
    settings = {"kind": "student", "round": round_index, "teacher_steps": teacher_steps,
                "student_steps": student_steps, "diffusion": dump["diffusion"], "data": dump["data"],
                "distill": distill, "pipeline_seed": cfg.pipeline.seed}
    if guidance_range is not None:
        settings["guidance"] = {"w_min": guidance_range[0], "w_max": guidance_range[1]}
    return _lineage(_with_text(settings, encoded_data, teacher_folder), parent_sha256, cfg)


def _with_text(settings: dict[str, Any], encoded_data: str | None, teacher_folder: str | None) -> dict[str, Any]:
    """A text-to-image job's settings plus its encoded data's and teacher folder's hashes (absent: not recorded)."""
    extra = {k: v for k, v in (("encoded_data", encoded_data), ("teacher_folder", teacher_folder)) if v is not None}
    return {**settings, **extra}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:21] + "..."


def _setting_name(key: str) -> str:
    """A settings key as the config field a user would change (``pipeline_seed`` -> ``pipeline.seed``)."""
    return {"pipeline_seed": "pipeline.seed", "imported_from_sha256": "pipeline.teacher_uri",
            "distill.updates": "distill.updates_per_round/last_rounds_updates/fast",
            "processes.nproc": "runtime.nproc", "processes.nodes": "runtime.nodes"}.get(key, key)


def settings_difference(stored: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> str:
    """The first differing settings, e.g. ``distill.lr 0.0005 -> 0.001`` (at most three, then a count)."""
    if not isinstance(stored, Mapping):
        return "the stored checkpoint records no settings"
    have, want = _flat(stored), _flat(wanted)
    keys = [k for k in dict.fromkeys([*want, *have]) if have.get(k, "<unset>") != want.get(k, "<unset>")]
    parts = [f"{_setting_name(k)} {_short(have.get(k, '<unset>'))} -> {_short(want.get(k, '<unset>'))}"
             for k in keys[:3]]
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(parts) + more


def difference(stored: Mapping[str, Any] | None, wanted: Lineage, *, check_settings: bool = True) -> str | None:
    """What differs between a stored manifest (or state meta) and ``wanted``; None when it is the same lineage.

    The parent is always compared; the settings only when ``check_settings``.
    """
    stored = stored if isinstance(stored, Mapping) else {}
    have_parent = stored.get("parent_sha256")
    if have_parent != wanted.parent_sha256:
        return _parent_difference(have_parent, wanted.parent_sha256, teacher=wanted.settings.get("kind") == "teacher")
    have_hash = stored.get("settings_hash")
    if check_settings and have_hash != wanted.settings_hash:
        return (f"other settings ({settings_difference(stored.get('settings'), wanted.settings)}; settings hash "
                f"{str(have_hash)[:SHORT]} != {wanted.settings_hash[:SHORT]})")
    return None


def _parent_difference(have: str | None, want: str | None, *, teacher: bool) -> str:
    if not teacher:
        return (f"another teacher (distilled from sha256 {str(have)[:SHORT]}; this run's teacher is sha256 "
                f"{str(want)[:SHORT]}: the teacher was replaced)")
    source = "trained here" if have is None else f"imported from sha256 {have[:SHORT]}"
    wanted = ("this run trains it (pipeline.teacher_uri is not set)" if want is None
              else f"pipeline.teacher_uri names sha256 {want[:SHORT]}")
    return f"another source ({source}; {wanted})"


def mismatch_message(*, label: str, uri: str, what: str, restart_from: int) -> str:
    """One line: which checkpoint, what differs, and the two ways on (a new pipeline, or retraining from here)."""
    return (f"{label} at {uri} was made from {what}; it is not reused. Rerun with --restart-from {restart_from} to "
            f"retrain it and every later round (their checkpoints are replaced), or with --name NEW for a new pipeline")


__all__ = ["Lineage", "PipelineMismatchError", "difference", "guided_lineage", "mismatch_message", "round_lineage",
           "settings_difference", "settings_hash", "teacher_lineage"]
