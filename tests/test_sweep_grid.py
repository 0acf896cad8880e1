"""A sweep's grid, its points' names and teachers, its comparison table and plot; bad grids refused in one line."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from flows.cli_args import BadArgument
from flows.sweep_grid import (
    MAX_POINTS,
    MAX_VALUES,
    check_sweep_name,
    grid_points,
    merge_grids,
    parse_grid_args,
    parse_grid_file,
    read_grid_file,
)
from tasks.tracking.sweeps import comparison_table, fd_columns, fd_name_of, fd_plot_png, per_step_columns, point_tags
from tests.pipeline.helpers import PNG_MAGIC, assert_one_line_error, run_pd


def test_grid_points_are_every_combination_in_order_named_after_what_they_change() -> None:
    grid = parse_grid_args(["distill.lr=1e-4,3e-4", "distill.student_parameterization=x,v"])
    points = grid_points("lr", merge_grids(grid))
    assert [p.name for p in points] == [f"lr.lr-{lr}.student_parameterization-{s}"
                                        for lr in ("1e-4", "3e-4") for s in ("x", "v")]
    assert points[1].overrides() == ["distill.lr=1e-4", "distill.student_parameterization=v"]


def test_fields_sharing_a_last_part_are_named_in_full_and_odd_characters_become_underscores() -> None:
    points = grid_points("s", parse_grid_args(["teacher.lr=1e-3", "distill.lr=5e-4", "pipeline.teacher_uri=file:///t"]))
    assert points[0].name == "s.teacher_lr-1e-3.distill_lr-5e-4.teacher_uri-file____t"


def test_excluded_combinations_are_left_out() -> None:
    eps_trunc = {"diffusion.parameterization": "eps", "diffusion.weighting": "snr_trunc"}
    grid, exclude = parse_grid_file({"grid": {"diffusion.parameterization": ["eps", "x"],
                                              "diffusion.weighting": ["snr", "snr_trunc"]}, "exclude": [eps_trunc]},
                                    source="f.yaml")
    names = [p.name for p in grid_points("a1", merge_grids(grid), exclude=exclude)]
    assert names == ["a1.parameterization-eps.weighting-snr", "a1.parameterization-x.weighting-snr",
                     "a1.parameterization-x.weighting-snr_trunc"]


def test_a_grid_file_is_read_and_merged_with_the_options(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text("grid:\n  distill.lr: [1.0e-4, 3.0e-4]\n  distill.fast: [true, false]\n")
    grid, exclude = read_grid_file(str(path))
    assert grid == {"distill.lr": ["0.0001", "0.0003"], "distill.fast": ["true", "false"]} and exclude == []
    merged = merge_grids(parse_grid_args(["pipeline.seed=0,1"]), grid)
    assert len(grid_points("g", merged)) == 8
    with pytest.raises(BadArgument, match="given twice"):
        merge_grids(parse_grid_args(["distill.lr=1"]), grid)


@pytest.mark.parametrize(("items", "message"), [
    (["distill.lr"], "malformed"),
    (["distill.lr=1,1"], "repeats a value"),
    (["distill.lr=1", "distill.lr=2"], "given twice"),
    (["pipeline.name=a,b"], "cannot vary"),
    (["storage.root=/a,/b"], "cannot vary"),
    (["lr=1,2"], "not a dotted config field"),
    ([f"distill.lr={','.join(str(i) for i in range(MAX_VALUES + 1))}"], f"more than {MAX_VALUES}"),
    (["distill.lr=1,"], "non-empty"),
])
def test_bad_grid_options_are_refused_naming_the_field(items: list[str], message: str) -> None:
    with pytest.raises(BadArgument, match=message):
        parse_grid_args(items)


def test_a_grid_over_the_point_bound_is_refused() -> None:
    grid = parse_grid_args(["distill.lr=1,2,3,4,5,6,7,8", "pipeline.seed=0,1,2,3,4,5,6,7", "distill.fast=true,false"])
    with pytest.raises(BadArgument, match=f"128 points, more than {MAX_POINTS}"):
        grid_points("big", grid)


def test_bad_sweep_names_and_grid_files_are_refused(tmp_path: Path) -> None:
    for name in ("", "a b", "-x", "x" * 41, "a.b"):
        with pytest.raises(BadArgument, match="--name"):
            check_sweep_name(name)
    with pytest.raises(BadArgument, match="does not exist"):
        read_grid_file(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("grid: [1, 2]\n")
    with pytest.raises(BadArgument, match="must hold a mapping"):
        read_grid_file(str(tmp_path / "bad.yaml"))
    (tmp_path / "ex.yaml").write_text("grid: {distill.lr: [1, 2]}\nexclude: [{distill.fast: true}]\n")
    with pytest.raises(BadArgument, match="not a grid field"):
        read_grid_file(str(tmp_path / "ex.yaml"))


def test_points_with_the_same_teacher_lineage_follow_the_first_of_them(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    from flows.sweep import point_configs
    from flows.sweep_grid import teacher_leaders

    monkeypatch.setenv("PD_HOME", str(tmp_path))
    points = grid_points("t", parse_grid_args(["teacher.lr=1e-3,2e-3", "distill.lr=1e-4,2e-4", "eval.num_samples=100"]))
    configs = point_configs(preset="smoke", config_path=None, overrides=[], points=points, storage=None,
                            tracking_uri=None)
    leaders = teacher_leaders(configs)
    by_teacher_lr: dict[str, set[str]] = {}
    for point in points:
        by_teacher_lr.setdefault(point.values["teacher.lr"], set()).add(leaders[point.name])
    # distill.lr and evaluation decide no teacher weight: one teacher per teacher.lr, trained by its first point
    assert by_teacher_lr == {"1e-3": {points[0].name}, "2e-3": {points[2].name}}


def _wide(fd: dict[int, float], teacher: dict[int, float]) -> pd.DataFrame:
    rows = [{"steps": n, "n_samples": 100, "teacher_ddim_fd_digits": teacher[n],
             "distilled_fd_digits": fd.get(n, math.nan), "floor_fd_digits": 0.4} for n in sorted(teacher)]
    return pd.DataFrame(rows)


def test_the_comparison_has_one_row_per_point_and_one_column_per_metric_and_step_count() -> None:
    points = {"s.a-1": {"x.a": "1"}, "s.a-2": {"x.a": "2"}, "s.a-3": {"x.a": "3"}}
    tables = {"s.a-1": _wide({1: 5.0, 2: 4.0}, {1: 9.0, 2: 7.0, 4: 6.0}),
              "s.a-2": _wide({1: 3.5, 2: 3.0}, {1: 9.0, 2: 7.0, 4: 6.0}), "s.a-3": None}
    table = comparison_table(points, tables)
    assert list(table.columns[:2]) == ["point", "x.a"]
    assert list(table["point"]) == list(points)
    assert table.loc[0, "distilled_fd_digits_1steps"] == 5.0 and table.loc[1, "distilled_fd_digits_2steps"] == 3.0
    assert table.loc[0, "teacher_ddim_fd_digits_4steps"] == 6.0
    assert "distilled_fd_digits_4steps" not in table.columns  # no distilled 4-step sampler measured
    assert math.isnan(table.loc[2, "distilled_fd_digits_1steps"])  # a point without a report: empty cells
    assert fd_name_of(table) == "fd_digits"
    assert list(fd_columns(table, fd_name="fd_digits")) == [1, 2]
    assert per_step_columns(tables["s.a-1"])["floor_fd_digits_4steps"] == 0.4
    assert fd_plot_png(table, fd_name="fd_digits", title="t")[:8] == PNG_MAGIC


def test_point_tags_name_the_sweep_and_each_grid_value() -> None:
    assert point_tags("s", {"distill.lr": "1e-4"}) == {"pd.sweep": "s", "pd.sweep.distill.lr": "1e-4"}


@pytest.mark.parametrize(("args", "mentions"), [
    (["--grid", "distill.lr"], "--grid"),
    (["--grid", "pipeline.name=a,b"], "cannot vary"),
    ([], "needs a grid"),
    (["--grid", "distill.nope=1,2"], "distill.nope"),
    (["--grid", "distill.lr=-1,1e-4"], "distill.lr"),
    (["--name", "a b", "--grid", "distill.lr=1,2"], "--name"),
])
def test_pd_sweep_refuses_bad_grids_in_one_line_with_exit_2(tmp_path: Path, args: list[str], mentions: str) -> None:
    proc = run_pd("sweep", *args, cwd=tmp_path, env={"PD_HOME": str(tmp_path / "home")}, timeout=120)
    assert_one_line_error(proc, code=2, mentions=mentions)
    assert not (tmp_path / "home" / "store").exists()  # nothing ran
