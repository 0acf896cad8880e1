"""Tracking URIs: local stores (sqlite, file) versus servers, and where their artifacts go."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit


def scheme(uri: str) -> str:
    """The URI's scheme, lower-case; ``""`` for a plain path."""
    return urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith(("sqlite:", "file:")) else ""


def local_store_path(uri: str) -> Path | None:
    """The local file behind a sqlite:/// or file: tracking URI (or a plain path), else None."""
    kind = scheme(uri)
    if kind == "sqlite":
        raw = unquote(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else ""
        return None if raw in ("", ":memory:") else Path(raw).expanduser().absolute()
    if kind == "file":
        return Path(unquote(urlsplit(uri).path)).expanduser().absolute()
    if kind == "" and uri:
        return Path(uri).expanduser().absolute()
    return None


def normalise_uri(uri: str) -> str:
    """Absolute sqlite/file URIs, so links and `mlflow ui` commands work from any directory."""
    path = local_store_path(uri)
    if path is None:
        return uri.rstrip("/") if scheme(uri) in ("http", "https") else uri
    if scheme(uri) == "sqlite":
        return f"sqlite:///{path.as_posix()}"  # absolute path -> sqlite:////abs/...
    return path.as_uri()


def default_artifact_location(uri: str) -> str | None:
    """``mlartifacts`` next to a sqlite file / file store, as file:// URI; None for servers."""
    path = local_store_path(uri)
    return None if path is None else (path.parent / "mlartifacts").as_uri()


def new_store_note(uri: str | None) -> str | None:
    """One line when ``uri`` names a sqlite file that does not exist yet (MLflow creates it), else None."""
    path = local_store_path(uri) if uri and scheme(uri) == "sqlite" else None
    if path is None or path.exists():
        return None
    return f"note: {path} does not exist yet: a new, empty MLflow database is created there (check --tracking-uri)"
