"""What every config section shares: the strict frozen base model, the field-located problem, small checks.

A section is a frozen pydantic model that refuses unknown keys and NaN/inf. Validators report a
problem with ``ValueError("must ..., got ...")``; a model validator that finds a problem at some
other field raises :class:`_FieldProblem` so the message is attributed to that (dotted) field.
Credentials never belong in a config: option names containing any of ``SECRET_KEY_PARTS`` and URLs
with ``user:password@`` are refused, because a config is logged and hashed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

# Substrings of storage option names that carry credentials; such values belong in the
# environment (AWS_ACCESS_KEY_ID, ...) or in fsspec's own config, never in a logged config.
SECRET_KEY_PARTS = ("key", "secret", "token", "password", "passwd", "credential")
# URL userinfo with a password ("scheme://user:pass@host") leaks credentials the same way.
_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")


class _FieldProblem(ValueError):
    """Raised inside model validators so the error is reported at ``field`` (dotted, relative to the model)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


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

