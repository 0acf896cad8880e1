"""Building a config: preset YAML, then a YAML file deep-merged over it, then dotted ``key=value`` overrides.

Presets are ``pd_core/presets/<name>.yaml`` (read through importlib.resources from package
``pd_core``; the first comment line describes the preset). Files may be local paths or fsspec URLs.
YAML is read with a SafeLoader that also takes ``1e-4`` as a float; override values are parsed as
YAML too (``model.ch_mult=[1,2,2]``, ``data.url=null``). Every problem is a one-line ConfigError.

Parsing is bounded: a document (file, preset or override value) has at most ``MAX_DOCUMENT_BYTES``,
and at most ``MAX_NODES`` YAML nodes once aliases are expanded (a node reached through n alias
references counts n times), so a "billion laughs" alias bomb is refused after composing its few
hundred bytes, before anything is built from it; a recursive alias is refused too.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import fsspec
import yaml

from pd_core.config.errors import ConfigError, _short_repr, validate_config
from pd_core.config.schema import Config

_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_][A-Za-z0-9_-]*)*$")
MAX_DOCUMENT_BYTES = 1 << 20  # 1 MiB: a config is a few KB
MAX_NODES = 100_000  # YAML nodes after alias expansion: a config has a few hundred


class _Refused(yaml.YAMLError):
    """A document that parses but is refused (too large once expanded, or recursive)."""


def _expanded_size(root: yaml.Node, *, limit: int) -> int:
    """Nodes of the tree under ``root`` with every alias expanded; stops counting past ``limit``.

    Shared subtrees are sized once (memoised), so the walk costs the unique nodes, not the expansion.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _Refused("it has a recursive alias (an anchor used inside itself); refusing it")
        open_nodes.add(key)
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 (no dot) as a float, like YAML 1.2 and like users expect, and refuses
    documents that expand to more than ``MAX_NODES`` nodes through aliases."""

    # copy the resolver table (lists included) so SafeLoader itself is left untouched
    yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        if node is not None and _expanded_size(node, limit=MAX_NODES) > MAX_NODES:
            raise _Refused(f"it expands to more than {MAX_NODES} YAML nodes through aliases (an alias bomb?); "
                           f"refusing it")
        return node


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, *, source: str) -> Any:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"{source} has {size} bytes, more than the {MAX_DOCUMENT_BYTES} bytes (1 MiB) a config "
                          f"document may have; refusing it")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except _Refused as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source} is not valid YAML{at}: {problem}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None


def _read_yaml_mapping(text: str, *, source: str) -> dict[str, Any]:
    data = _parse_yaml(text, source=source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must contain a mapping of sections (model:, data:, ...), "
                          f"got {type(data).__name__}")
    return data


def _preset_files() -> dict[str, Any]:
    folder = resources.files("pd_core") / "presets"
    return {f.name[:-5]: f for f in folder.iterdir() if f.name.endswith(".yaml")}


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description (the first comment line of its YAML, without a leading ``name:``)."""
    out = {}
    for name, file in sorted(_preset_files().items()):
        first = file.read_text(encoding="utf-8").lstrip().splitlines()[:1]
        line = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
        out[name] = line[len(name) + 1:].strip() if line.startswith(f"{name}:") else line
    return out


def preset_yaml(name: str) -> str:
    """The raw YAML text of a preset (for display); ConfigError for an unknown name."""
    files = _preset_files()
    if name not in files:
        guess = difflib.get_close_matches(name, list(files), n=1, cutoff=0.5)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(sorted(files))}")
    return files[name].read_text(encoding="utf-8")


def parse_override(item: str) -> tuple[str, Any]:
    """``"distill.lr=1e-4"`` -> ``("distill.lr", 0.0001)``; the value is parsed as YAML (lists, null, ...)."""
    example = "expected KEY=VALUE with a dotted KEY, e.g. distill.lr=1e-4 or model.ch_mult=[1,2,2]"
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {_short_repr(item)} is malformed: {example}")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not _OVERRIDE_KEY.match(key):
        raise ConfigError(f"override {_short_repr(item)} is malformed: key {_short_repr(key)} is not a dotted "
                          f"field name; {example}")
    value = _parse_yaml(raw, source=f"the value of override {key}")
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree[a][b][c] = value for key 'a.b.c', creating sections as needed."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[:depth + 1])} is a value "
                              f"({_short_repr(child)}), not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(dict(base))  # callers may mutate the result (overrides) without touching base
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_text(path: str) -> str:
    """Text of a local path or any fsspec URL (at most ``MAX_DOCUMENT_BYTES``; more is refused unread)."""
    local = os.path.expanduser(path) if "://" not in path else path
    try:
        with fsspec.open(local, "rb") as f:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ConfigError(f"config file {path} is larger than the {MAX_DOCUMENT_BYTES} bytes (1 MiB) a config "
                              f"may have; refusing it")
        return data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; give an existing YAML path or URL") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give a YAML file") from None
    except (OSError, UnicodeDecodeError, ValueError, ImportError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config file {path} could not be read: {exc}") from None


def load_config(*, preset: str | None = None, path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Preset YAML, then the file's YAML deep-merged over it, then ``key=value`` overrides; validated."""
    tree: dict[str, Any] = {}
    if preset is not None:
        tree = _read_yaml_mapping(preset_yaml(preset), source=f"preset {preset}")
    if path is not None:
        tree = deep_merge(tree, _read_yaml_mapping(_read_text(path), source=f"config file {path}"))
    if isinstance(overrides, str):  # a lone string would be split into characters
        overrides = [overrides]
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return validate_config(tree)

