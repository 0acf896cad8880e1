"""URLs a config or the command line takes: a protocol fsspec can open, and no credentials in them.

:func:`url_problem` says in one phrase what is wrong with a URL (or None): an unknown protocol, a
protocol whose package is missing (checked without importing it), or a credential
(:mod:`pd_core.config.secrets`). Nothing here opens a connection.
"""

from __future__ import annotations

import importlib.util

from fsspec.registry import known_implementations, registry

from pd_core.config.secrets import credential_problem


def protocol_problem(url: str) -> str | None:
    """What is wrong with the protocols of ``url`` (``s3://``, chained ``simplecache::s3://``); None if fsspec
    knows each of them and its package is installed. A plain path has no protocol and no problem."""
    for part in url.split("::"):
        if "://" not in part:
            continue
        protocol = part.split("://", 1)[0].lower()
        if protocol in registry:
            continue
        spec = known_implementations.get(protocol)
        if spec is None:
            return (f"has an unknown protocol {protocol!r}; use a path or a URL such as file:///data/store, "
                    f"s3://bucket/prefix or memory://store")
        package = str(spec["class"]).split(".", 1)[0]
        if importlib.util.find_spec(package) is None:
            return f"uses {protocol}://, which needs the Python package {package!r}: pip install {package}"
    return None


def check_protocols(url: str) -> str:
    """``url``, or ValueError with :func:`protocol_problem`'s phrase."""
    problem = protocol_problem(url)
    if problem is not None:
        raise ValueError(problem)
    return url


def url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a storage location (protocol or credentials), in one phrase; None if nothing."""
    credential = credential_problem(url)
    if credential is not None:
        return f"must not contain credentials (found {credential}); pass them through environment variables instead"
    return protocol_problem(url)
