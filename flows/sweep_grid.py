"""A sweep's grid: config fields and their values, expanded into named points, checked before anything heavy runs.

A grid maps dotted config fields to value lists; its points are the Cartesian product, in the order the
fields and values are given (the last field varies fastest), minus the combinations an ``exclude``
entry matches (every field it names has the value it gives). Each point is a pipeline run with the
sweep's overrides plus one ``FIELD=VALUE`` override per grid field, named after what it changes:

    <sweep>.<field>-<value>[.<field>-<value>...]     e.g.  lr.lr-1e-4.student_parameterization-x

where ``<field>`` is the last part of the dotted name (the whole name, dots as '_', when two grid fields
share a last part) and characters a pipeline name cannot hold become '_'. A name over 100 characters
becomes ``<sweep>.p<index>``.

Bounds (one line naming the bound and the fix, exit 2): at most MAX_FIELDS fields, MAX_VALUES values per
field, MAX_POINTS points, MAX_VALUE_CHARS characters per value; no repeated field or value; the fields
that name the sweep's pipelines, store or MLflow (``pipeline.name``, ``pipeline.restart_from``,
``storage.*``, ``tracking.*``) cannot vary.

A grid file is YAML: ``grid: {FIELD: [VALUE, ...], ...}`` and optionally ``exclude: [{FIELD: VALUE, ...}]``.
Points whose teachers have the same lineage (:func:`pd_core.lineage.teacher_lineage`) share the teacher of
the first of them (:func:`teacher_leaders`). No Prefect, MLflow or torch is imported here.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flows.cli_args import BadArgument
from pd_core.config import Config
from pd_core.lineage import teacher_lineage

MAX_FIELDS = 6
MAX_VALUES = 16
MAX_POINTS = 64
MAX_VALUE_CHARS = 200
MAX_FILE_BYTES = 64 * 1024
MAX_NAME_CHARS = 100  # pd_core.config's pipeline-name bound
FIXED_FIELDS = ("pipeline.name", "pipeline.restart_from")
FIXED_SECTIONS = ("storage.", "tracking.")
_FIELD = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_SWEEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: its pipeline name and the grid value of each field (as given, a string)."""

    name: str
    values: dict[str, str] = field(default_factory=dict)

    def overrides(self) -> list[str]:
        """The ``--set`` overrides that make this point (after the sweep's own)."""
        return [f"{key}={value}" for key, value in self.values.items()]


def check_sweep_name(name: str) -> str:
    """A sweep name: 1-40 letters, digits, '_' or '-', starting with a letter or digit (its points add to it)."""
    if not _SWEEP_NAME.match(name or ""):
        raise BadArgument(f"--name {name!r} must be 1-40 letters, digits, '_' or '-' starting with a letter or digit "
                          f"(every point's pipeline name starts with it)")
    return name


def _check_field(key: str, *, source: str) -> str:
    if not _FIELD.match(key):
        raise BadArgument(f"{source}: {key!r} is not a dotted config field such as distill.lr")
    if key in FIXED_FIELDS or key.startswith(FIXED_SECTIONS):
        raise BadArgument(f"{source}: {key} cannot vary in a sweep (the sweep names its pipelines and shares one store "
                          f"and one MLflow); set it once with --set or --storage / --tracking-uri")
    return key


def _check_values(key: str, values: Sequence[Any], *, source: str) -> list[str]:
    texts = ["null" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in values]
    if not texts or any(not t.strip() for t in texts):
        raise BadArgument(f"{source}: {key} needs at least one non-empty value, e.g. {key}=A,B")
    if len(texts) > MAX_VALUES:
        raise BadArgument(f"{source}: {key} has {len(texts)} values, more than {MAX_VALUES}; split the sweep")
    long = next((t for t in texts if len(t) > MAX_VALUE_CHARS), None)
    if long is not None:
        raise BadArgument(f"{source}: a value of {key} has {len(long)} characters, more than {MAX_VALUE_CHARS}")
    if len(set(texts)) != len(texts):
        raise BadArgument(f"{source}: {key} repeats a value ({', '.join(texts)}); give each value once")
    return texts


def parse_grid_args(items: Sequence[str]) -> dict[str, list[str]]:
    """``--grid FIELD=V1,V2`` options as {field: values}, in the order given."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, rest = item.partition("=")
        if not sep:
            raise BadArgument(f"--grid {item!r} is malformed: write FIELD=VALUE1,VALUE2 (e.g. distill.lr=1e-4,3e-4)")
        key = _check_field(key.strip(), source="--grid")
        if key in grid:
            raise BadArgument(f"--grid {key} is given twice; list all its values in one --grid {key}=A,B")
        grid[key] = _check_values(key, [v.strip() for v in rest.split(",")], source="--grid")
    return grid


def parse_grid_file(data: Any, *, source: str) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """A grid file's parsed YAML as (grid, exclude)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("grid"), Mapping) or not data["grid"]:
        raise BadArgument(f"{source} must hold a mapping 'grid: {{FIELD: [VALUE, ...]}}' with at least one field")
    unknown = sorted(set(data) - {"grid", "exclude"})
    if unknown:
        raise BadArgument(f"{source}: unknown key {unknown[0]!r}; a grid file holds 'grid' and optionally 'exclude'")
    grid: dict[str, list[str]] = {}
    for key, values in data["grid"].items():
        values = values if isinstance(values, list) else [values]
        grid[_check_field(str(key), source=source)] = _check_values(str(key), values, source=source)
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, Mapping) and e for e in exclude):
        raise BadArgument(f"{source}: 'exclude' must be a list of mappings {{FIELD: VALUE, ...}}")
    rules = [{str(k): _check_values(str(k), [v], source=source)[0] for k, v in e.items()} for e in exclude]
    for rule in rules:
        missing = next((k for k in rule if k not in grid), None)
        if missing is not None:
            raise BadArgument(f"{source}: exclude names {missing}, which is not a grid field")
    return grid, rules


def read_grid_file(path: str) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    """``--grid-file``: a local YAML file of at most MAX_FILE_BYTES, as (grid, exclude)."""
    import yaml

    source = f"--grid-file {path}"
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise BadArgument(f"{source} has {size} bytes, more than {MAX_FILE_BYTES}; a grid file lists fields and "
                              f"values only")
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise BadArgument(f"{source} does not exist; give an existing YAML file") from None
    except IsADirectoryError:
        raise BadArgument(f"{source} is a folder; give a YAML file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise BadArgument(f"{source} could not be read as YAML: {str(err).splitlines()[0]}") from None
    return parse_grid_file(data, source=source)


def merge_grids(*grids: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Grids from options and a file as one; a field in two of them is refused."""
    merged: dict[str, list[str]] = {}
    for grid in grids:
        for key, values in grid.items():
            if key in merged:
                raise BadArgument(f"grid field {key} is given twice (--grid and the grid file); give it once")
            merged[key] = list(values)
    if not merged:
        raise BadArgument("a sweep needs a grid: --grid FIELD=V1,V2 (repeatable) or --grid-file FILE")
    if len(merged) > MAX_FIELDS:
        raise BadArgument(f"the grid has {len(merged)} fields, more than {MAX_FIELDS}; split the sweep")
    return merged


def _labels(keys: Sequence[str]) -> dict[str, str]:
    last = [k.rsplit(".", 1)[1] for k in keys]
    return {k: (short if last.count(short) == 1 else k.replace(".", "_")) for k, short in zip(keys, last, strict=True)}


def grid_points(sweep: str, grid: Mapping[str, Sequence[str]], *,
                exclude: Sequence[Mapping[str, str]] = ()) -> list[SweepPoint]:
    """The grid's points in order (last field fastest), named after what they change; bounded by MAX_POINTS."""
    keys = list(grid)
    total = 1
    for key in keys:
        total *= len(grid[key])
    if total > MAX_POINTS:
        raise BadArgument(f"the grid has {total} points, more than {MAX_POINTS}; fewer values, or split the sweep")
    labels = _labels(keys)
    points: list[SweepPoint] = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        if any(all(values.get(k) == v for k, v in rule.items()) for rule in exclude):
            continue
        name = ".".join([sweep, *(f"{labels[k]}-{_UNSAFE.sub('_', v)}" for k, v in values.items())])
        name = re.sub(r"\.{2,}", ".", name)
        if len(name) > MAX_NAME_CHARS:
            name = f"{sweep}.p{len(points):02d}"
        points.append(SweepPoint(name=name, values=values))
    if not points:
        raise BadArgument("every grid point is excluded; nothing to run")
    names = [p.name for p in points]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:
        raise BadArgument(f"two grid points get the pipeline name {clash}; values must differ in letters, digits, "
                          f"'.', '_' or '-'")
    return points


def teacher_leaders(configs: Mapping[str, Config]) -> dict[str, str]:
    """{point: the first point with the same teacher lineage} (itself when it trains its teacher); a point that
    imports its teacher (pipeline.teacher_uri) leads itself."""
    first: dict[str, str] = {}
    leaders: dict[str, str] = {}
    for name, cfg in configs.items():
        if cfg.pipeline.teacher_uri:
            leaders[name] = name
            continue
        key = teacher_lineage(cfg).settings_hash
        leaders[name] = first.setdefault(key, name)
    return leaders
