"""What every config section shares: the strict frozen base model, the field-located problem, small checks.

A section is a frozen pydantic model that refuses unknown keys and NaN/inf. Validators report a
problem with ``ValueError("must ..., got ...")``; a model validator that finds a problem at some
other field raises :class:`_FieldProblem` so the message is attributed to that (dotted) field.
Credentials never belong in a config: option names containing any of ``SECRET_KEY_PARTS``, and URLs
(in any field or option value) with ``user:password@`` or a credential query parameter
(:mod:`pd_core.config.secrets`) are refused, because a config is logged, hashed and stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from pd_core.config.secrets import credential_problem, no_credentials

# Substrings of storage option names that carry credentials; such values belong in the
# environment (AWS_ACCESS_KEY_ID, ...) or in fsspec's own config, never in a logged config.
SECRET_KEY_PARTS = ("key", "secret", "token", "password", "passwd", "credential")


class _FieldProblem(ValueError):
    """Raised inside model validators so the error is reported at ``field`` (dotted, relative to the model)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _no_credentials_in_url(value: str | None) -> str | None:
    """A URL field's validator: ``value``, or ValueError saying what credential it holds (not the credential)."""
    return no_credentials(value)


def _secret_option_paths(options: Mapping[Any, Any], prefix: str = "") -> list[str]:
    """Dotted names of (nested) options that carry credentials: a secret-looking key, or a URL value with one.

    Values are looked into at any depth, lists included (e.g. ``client_kwargs.endpoint_url``).
    """
    found = []
    for key, value in options.items():
        name = f"{prefix}{key}"
        if any(part in str(key).lower() for part in SECRET_KEY_PARTS):
            found.append(name)
        found.extend(_secret_value_paths(value, name))
    return found


def _secret_value_paths(value: Any, name: str) -> list[str]:
    if isinstance(value, Mapping):
        return _secret_option_paths(value, prefix=f"{name}.")
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in _secret_value_paths(item, f"{name}[{i}]")]
    if isinstance(value, str) and credential_problem(value) is not None:
        return [name]
    return []


def _leaf_types(annotation: Any) -> set[Any]:
    """The classes inside an annotation (``tuple[int, ...] | None`` -> {int, NoneType}); Literal values excluded."""
    if get_origin(annotation) is Literal:
        return set()
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_leaf_types(arg) for arg in args if arg is not Ellipsis))


class _Section(BaseModel):
    """Base of every config section: unknown keys refused, no NaN/inf, immutable once validated."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """``true`` is not 1: a boolean for a numeric field (or a list of numbers) is refused, not converted."""
        leaves = _leaf_types(cls.model_fields[info.field_name].annotation)
        numeric = bool(leaves & {int, float}) and bool not in leaves
        items = value if isinstance(value, (list, tuple)) else [value]
        if numeric and any(isinstance(item, bool) for item in items):
            if isinstance(value, bool):
                raise ValueError(f"must be a number, got {str(value).lower()}")
            shown = ", ".join(str(v).lower() if isinstance(v, bool) else repr(v) for v in items)
            raise ValueError(f"must be a list of numbers, got [{shown}]")
        return value

