"""Views of a validated config: its hash, flat MLflow params, YAML text, and field descriptions.

``config_hash`` is sha256 of the canonical JSON (sorted keys, no NaN) of the whole config or of the
named sections; ``flatten`` gives dotted keys -> scalars (lists as JSON, None as 'null');
``pipeline_params`` picks the few of them that tell pipelines apart (MLflow params; the whole config
travels as a YAML artifact).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from pydantic import BaseModel

from pd_core.config.errors import ConfigError
from pd_core.config.schema import Config


def config_hash(cfg: Config, *, sections: Iterable[str] | None = None, omit: Iterable[str] = ()) -> str:
    """sha256 hex of the canonical JSON (sorted keys) of ``cfg``, or of only the named sections.

    ``sections`` lets a caller hash what determines a result (e.g. model, diffusion, data, distill)
    without tracking/runtime settings that may differ between an original run and its resume.
    ``omit`` names dotted fields (``section.field``) left out of the hash, e.g. an optional feature at
    its off value, so configs that do not use the feature hash as if it did not exist.
    """
    dump = cfg.model_dump(mode="json")
    if sections is not None:
        names = list(sections)
        unknown = [n for n in names if n not in dump]
        if unknown:
            raise ConfigError(f"config_hash sections must be among {', '.join(dump)}, got {unknown[0]!r}")
        dump = {n: dump[n] for n in names}
    for dotted in omit:
        section, _, name = dotted.partition(".")
        if section not in dump or name not in dump[section]:
            raise ConfigError(f"config_hash omit must name fields as section.field, got {dotted!r}")
        dump[section] = {k: v for k, v in dump[section].items() if k != name}
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


# The settings that tell one pipeline from another, in the order a comparison reads them: what was distilled,
# how, and how it was measured. Everything else is in the run's config.yaml and in ``settings_sha256``.
PIPELINE_PARAMS = (
    "pipeline.name", "pipeline.teacher_uri", "pipeline.seed", "data.name", "data.image_size", "model.ch",
    "model.class_conditional", "diffusion.parameterization", "diffusion.weighting", "teacher.updates", "teacher.lr",
    "distill.start_steps", "distill.final_steps", "distill.updates_per_round", "distill.batch_size", "distill.lr",
    "distill.student_parameterization", "guidance.enabled", "eval.num_samples", "eval.features",
)
# The sections that decide a pipeline's weights and numbers (not where it stores, tracks or runs).
RESULT_SECTIONS = ("model", "diffusion", "data", "teacher", "distill", "guidance", "eval")


def pipeline_params(cfg: Config) -> dict[str, str | int | float | bool]:
    """MLflow params of a pipeline's runs: the :data:`PIPELINE_PARAMS` of ``flatten(cfg)`` and
    ``settings_sha256``, the first 16 hex digits of :func:`config_hash` over :data:`RESULT_SECTIONS` (equal
    when every setting that decides the results is equal, whatever the params show)."""
    flat = flatten(cfg)
    return {**{k: flat[k] for k in PIPELINE_PARAMS}, "settings_sha256": config_hash(cfg, sections=RESULT_SECTIONS)[:16]}


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (``load_config(path=...)`` of it gives back an equal Config)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=100)


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

