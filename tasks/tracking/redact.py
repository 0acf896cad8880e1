"""Nothing sent to MLflow is trusted to be clean: secret redaction, param/tag cleaning, truncation.

Params, tags, metric names, run names and text artifacts go through :func:`redact`, which replaces the
values of secret-looking environment variables, URL passwords and credential query parameters
(``?token=...``) with ``***``; params and tags whose
name looks like a secret get ``***`` whatever the environment says; values longer than MLflow accepts
are truncated with a note.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pd_core.config.secrets import redact_query

log = logging.getLogger("tasks.tracking")  # the package's one logger: callers filter records on this name

# MLflow's own limits (mlflow/utils/validation.py); longer values are truncated with a note.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000

# Environment variable names whose values are secrets (matched anywhere in the name).
_SECRET_ENV_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# Values too generic to redact even when a secret-looking variable holds them (flags, not secrets).
_NOT_SECRET_VALUES = frozenset({"true", "false", "none", "null", "0000"})
# Param/tag names whose value is a secret whatever the environment says (defence in depth).
_SECRET_KEY = re.compile(r"(^|[._-])(key|secret|password|passwd|token|api_?key|access_key(_id)?|"
                         r"secret_access_key|session_token|private_key|credentials?)$", re.I)
# scheme://user:password@host -> scheme://user:***@host
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@/\s]+)@")
# Artifacts with these suffixes are read as text and redacted before upload.
_TEXT_SUFFIXES = frozenset({".txt", ".md", ".json", ".yaml", ".yml", ".csv", ".log", ".html", ".toml", ".cfg", ".ini"})


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, object]:
    """Nested dict (or pydantic model) -> ``{"a.b.c": value}``; lists stay values; empty dicts stay ``{}``.

    The resolved config is flattened this way for every run, so parent and child runs of every
    pipeline carry the same param names and line up in MLflow's compare view.
    """
    if hasattr(d, "model_dump"):
        d = d.model_dump(mode="json")
    out: dict[str, object] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
        else:
            out[name] = value
    return out


def _secret_values() -> list[str]:
    """Secret env values in the forms they may appear in (raw, URL-quoted), longest first."""
    values = {v for k, v in os.environ.items()
              if _SECRET_ENV_NAME.search(k) and len(v) >= 4 and v.lower() not in _NOT_SECRET_VALUES}
    forms = set(values)
    for v in values:
        forms |= {quote(v, safe=""), quote(v, safe="/:"), quote(v, safe="/"), json.dumps(v)[1:-1]}
    # Longest first, so a secret that contains another secret is replaced whole.
    return sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)


def redactor() -> Callable[[str], str]:
    """A redact function with the secrets read once (for batches of values)."""
    secrets = _secret_values()

    def apply(text: str) -> str:
        if not isinstance(text, str):
            text = str(text)
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return redact_query(_URL_PASSWORD.sub(r"\g<head>:***@", text))

    return apply


def redact(text: str) -> str:
    """Replace values of secret-looking environment variables (len >= 4) and URL passwords with ``***``.

    Secret-looking: AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN, MLFLOW_TRACKING_PASSWORD
    and any name containing SECRET, TOKEN, PASSWORD, PASSWD, API_KEY, ACCESS_KEY, PRIVATE_KEY or CREDENTIAL.
    """
    return redactor()(text)


def clean_key(key: object, red: Callable[[str], str]) -> str:
    """A redacted name MLflow still accepts (names may not contain ``*``)."""
    return red(str(key)).replace("***", "REDACTED")


def _truncate(value: str, limit: int, *, what: str) -> str:
    """Cut a value to MLflow's limit, saying so in the value and in one log line."""
    if len(value) <= limit:
        return value
    note = f"...[truncated {len(value) - limit} chars]"
    log.info("%s is %d chars, longer than MLflow's limit %d: truncated", what, len(value), limit)
    return value[: limit - len(note)] + note


def clean_params(params: Mapping[str, object], red: Callable[[str], str]) -> dict[str, str]:
    """Flattened, str()-ed, redacted, truncated param values; secret-named keys get ``***``."""
    out: dict[str, str] = {}
    for key, value in flatten_params(params).items():
        name = clean_key(key, red)
        text = "***" if _SECRET_KEY.search(key) and value not in (None, "") else red(str(value))
        out[name] = _truncate(text, MAX_PARAM_VALUE, what=f"param {name}")
    return out


def redacted_mapping(d: Mapping[str, Any], red: Callable[[str], str]) -> dict[str, Any]:
    """A nested mapping with every secret-named key's value ``***`` and every string redacted (same shape)."""
    def clean(key: str, value: Any) -> Any:
        if _SECRET_KEY.search(key) and value not in (None, ""):
            return "***"
        if isinstance(value, Mapping):
            return {k: clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean("", v) for v in value]
        return red(value) if isinstance(value, str) else value

    return {str(k): clean(str(k), v) for k, v in d.items()}


def clean_tags(tags: Mapping[str, object] | None, red: Callable[[str], str]) -> dict[str, str]:
    """Redacted, truncated tag values; secret-named keys get ``***``."""
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        name = clean_key(key, red)
        text = "***" if _SECRET_KEY.search(str(key)) and value not in (None, "") else red(str(value))
        out[name] = _truncate(text, MAX_TAG_VALUE, what=f"tag {name}")
    return out


def redacted_copy(src: Path, tmp: Path) -> Path:
    """The path to upload: a redacted copy of text files that contain secrets, else ``src`` itself."""
    if src.is_dir():
        if not any(p.suffix.lower() in _TEXT_SUFFIXES for p in src.rglob("*") if p.is_file()):
            return src
        dst = tmp / src.name
        shutil.copytree(src, dst)
        for path in dst.rglob("*"):
            if path.is_file() and path.suffix.lower() in _TEXT_SUFFIXES:
                _redact_file(path, path)
        return dst
    if src.suffix.lower() not in _TEXT_SUFFIXES:
        return src
    dst = tmp / src.name
    return dst if _redact_file(src, dst) else src


def _redact_file(src: Path, dst: Path) -> bool:
    """Write a redacted ``src`` to ``dst`` when redaction changes it; True if written."""
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return False
    clean = redact(text)
    if clean == text and src != dst:
        return False
    dst.write_text(clean, encoding="utf-8")
    return True
