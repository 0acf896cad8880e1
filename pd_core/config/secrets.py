"""Credentials inside URLs: found, described without their value, and redacted.

Two places of a URL carry credentials: the userinfo (``scheme://user:password@host``) and query
parameters such as ``?token=...``, ``?X-Amz-Signature=...`` or ``?sig=...`` (presigned or SAS URLs).
A config or a command line is logged and stored (Prefect flow-run parameters, MLflow params), so a
URL holding either is refused; :func:`credential_problem` says what was found (the parameter's
name, never its value), :func:`redact_text` replaces the values in any text with ``***`` and
:func:`strip_credentials` removes them (to key something by a URL whatever its credentials).
Pure string work: no imports beyond the standard library.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

# Query parameter names (lower-case) whose value is a credential.
TOKEN_PARAMS = frozenset({
    "token", "access_token", "id_token", "refresh_token", "auth", "auth_token", "authorization", "bearer",
    "password", "passwd", "pwd", "secret", "client_secret", "secret_key", "api_key", "apikey", "api-key", "key",
    "access_key", "private_key", "session_token", "security_token", "credential", "credentials", "sig",
    "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
    "x-goog-credential", "x-ms-signature", "code",
})
_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*://"
# scheme://user:password@  (the password may be empty: "user:@host" still names a credential slot)
_USERINFO_PASSWORD = re.compile(rf"(?P<scheme>{_SCHEME})(?P<user>[^/?#@\s:]*):(?P<secret>[^/?#\s]*)@")
# ?name=value or &name=value, value up to the next &, #, whitespace or quote
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.~-]+)=)(?P<secret>[^&#\s'\"]*)")


def _is_token_param(name: str) -> bool:
    return name.lower() in TOKEN_PARAMS


def credential_problem(value: str) -> str | None:
    """What credential ``value`` (a URL or path) carries, described without the secret; None if none."""
    if not isinstance(value, str) or not value:
        return None
    if _USERINFO_PASSWORD.search(value):
        return "a password in the URL (user:password@)"
    try:
        query = urlsplit(value).query if "://" in value else value.partition("?")[2]
    except ValueError:  # e.g. an invalid IPv6 host: still look at the raw query text below
        query = value.partition("?")[2]
    names = [name for name, _ in parse_qsl(query, keep_blank_values=True)]
    names += [m.group("name") for m in _QUERY_PARAM.finditer(value)]
    found = sorted({n for n in names if _is_token_param(n)}, key=str.lower)
    if found:
        return f"a credential in the query parameter {found[0]!r}"
    return None


def no_credentials(value: str | None) -> str | None:
    """``value`` unchanged, or ValueError naming what kind of credential it holds (never the credential)."""
    if value is None:
        return None
    problem = credential_problem(value)
    if problem is not None:
        raise ValueError(f"must not contain credentials (found {problem}); pass them through environment variables "
                         "(e.g. AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_TOKEN) or the tool's own config instead")
    return value


def redact_query(text: str) -> str:
    """``text`` with the values of credential query parameters (``?token=...``) replaced by ``***``."""
    return _QUERY_PARAM.sub(lambda m: m.group("head") + ("***" if _is_token_param(m.group("name"))
                                                           else m.group("secret")), text)


def redact_text(text: str) -> str:
    """``text`` with URL userinfo holding a password (user included) and credential query values as ``***``."""
    if not isinstance(text, str):
        text = str(text)
    return redact_query(_USERINFO_PASSWORD.sub(lambda m: f"{m.group('scheme')}***@", text))


def strip_credentials(url: str) -> str:
    """``url`` without a userinfo that holds a password and without credential query parameters (for keys)."""
    text = _USERINFO_PASSWORD.sub(lambda m: m.group("scheme"), url)
    text = _QUERY_PARAM.sub(lambda m: "" if _is_token_param(m.group("name")) else m.group(0), text)
    if "?" not in text and "&" in text.partition("#")[0]:  # the first parameter went: keep the query well formed
        text = text.replace("&", "?", 1)
    return text.rstrip("?&")
