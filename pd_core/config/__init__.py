"""Configuration: pydantic models (one per concern), named presets, overrides, hashing.

A run's configuration is built in three layers, each deep-merged over the previous one:
a named preset (``pd_core/presets/<name>.yaml``), an optional YAML file (path or fsspec URL),
then dotted ``key=value`` overrides (``distill.lr=1e-4``; values are parsed as YAML).
Every problem becomes a :class:`ConfigError` whose message is ONE line that names the dotted
field path and says what would be accepted, e.g.
``distill.start_steps must be a power of two >= 2, got 6``.

Models are frozen: a validated config is a value (it is hashed into checkpoint manifests);
derive a changed one with ``cfg.model_copy(update=...)`` or through :func:`load_config`.

The package imports only pydantic, yaml, fsspec and :mod:`pd_core.kinds` (never torch), so a
config can be validated before anything heavy loads. Modules, lowest first: ``secrets``
(credentials in URLs), ``urls`` (protocols), ``base`` (what sections share), ``training`` and
``services`` (the sections), ``schema`` (:class:`Config`), ``errors`` (one-line, redacted
messages, :func:`validate_config`), ``loading`` (bounded YAML, presets, overrides) and ``views``
(hash, flat params, YAML text, descriptions).
"""

from pd_core.config.errors import ConfigError, validate_config
from pd_core.config.loading import deep_merge, list_presets, load_config, parse_override, preset_yaml
from pd_core.config.schema import Config
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
from pd_core.config.views import config_hash, field_descriptions, flatten, pipeline_params, to_yaml

__all__ = [
    "Config", "ConfigError", "DataConfig", "DiffusionConfig", "DistillConfig", "EvalConfig", "GuidanceConfig",
    "ModelConfig",
    "PipelineConfig", "RuntimeConfig", "StorageConfig", "TeacherConfig", "TrackingConfig",
    "config_hash", "deep_merge", "field_descriptions", "flatten", "list_presets", "load_config",
    "parse_override", "pipeline_params", "preset_yaml", "to_yaml", "validate_config",
]
