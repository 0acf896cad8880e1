"""ConfigError and the translation of pydantic's errors into it: one line per problem, naming the dotted field.

``_explain`` turns one pydantic error into ``"<dotted.path> must ..., got ..."`` (or "unknown field
... (did you mean ...?)", "section ... is missing: set ..."); ``_config_error`` joins the distinct
messages with "; ", at most three, and counts the rest. :func:`validate_config` is the one place a
mapping becomes a :class:`~pd_core.config.schema.Config`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from pd_core.config.base import _FieldProblem
from pd_core.config.schema import Config
from pd_core.config.secrets import redact_text


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the dotted field and the fix.

    Values echoed in it (``got ...``) have URL credentials redacted: a refused secret is never printed.
    """

    def __init__(self, message: str):
        super().__init__(redact_text(" ".join(str(message).split())))  # one line, whatever went in


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

