"""tasks.report's pure parts: what the parent run, the Prefect table and the report get from the quality table.

Records are made up here; the expected values are read off them directly (not through the table code).
"""

from __future__ import annotations

import math

import pytest

from pd_core.metrics import quality_table
from pd_core.metrics.table import summary_view
from tasks.evaluate import grid_artifact_path
from tasks.report import (
    _grid_line,
    concise_rows,
    markdown_table,
    parent_metrics,
    quality_columns,
    short_headers,
    worse_than_teacher,
)
from tasks.tracking import Tracker

RECORDS = [
    {"sampler": "floor", "steps": None, "n_samples": 100, "fd_digits": 1.93562169, "kid_digits": 0.0182},
    *[{"sampler": "teacher_ddim", "steps": n, "n_samples": 100, "fd_digits": 10.0 + 1 / n, "kid_digits": 0.01 * n,
       "kid_digits_std": 0.001, "seconds_per_image": 0.001 * n} for n in (1, 2, 4, 8)],
    *[{"sampler": "distilled", "steps": n, "n_samples": 100, "fd_digits": 20.0 + 0.123456789 * n,
       "kid_digits": 0.02 * n, "kid_digits_std": 0.002, "seconds_per_image": 0.0007634567} for n in (1, 2, 4)],
]


def test_parent_gets_the_series_and_one_key_per_step_count_from_the_records():
    by_steps, floor = parent_metrics(quality_table(RECORDS))
    assert sorted(by_steps) == [1, 2, 4, 8]
    for n in (1, 2, 4):
        assert by_steps[n]["distilled_fd_digits"] == by_steps[n][f"distilled_fd_digits_{n}steps"] == \
            pytest.approx(20.0 + 0.123456789 * n)
        assert by_steps[n][f"distilled_kid_digits_{n}steps"] == pytest.approx(0.02 * n)
        assert f"distilled_kid_digits_std_{n}steps" not in by_steps[n]  # headline keys only
        assert f"distilled_seconds_per_image_{n}steps" not in by_steps[n]
    for n in (1, 2, 4, 8):
        assert by_steps[n][f"teacher_ddim_fd_digits_{n}steps"] == pytest.approx(10.0 + 1 / n)
    assert not any(k.startswith("distilled") for k in by_steps[8])  # no student at 8 steps: no NaN logged
    assert floor == {"floor_fd_digits": pytest.approx(1.93562169), "floor_kid_digits": pytest.approx(0.0182)}
    assert all(not math.isnan(v) for values in by_steps.values() for v in values.values())
    # the first key a run logs is what MLflow's Compare page plots: the 1-step student's FD
    assert list(by_steps[1])[:2] == ["distilled_fd_digits_1steps", "distilled_kid_digits_1steps"]
    keys = list(by_steps[1])
    assert all(not k.startswith("distilled") for k in keys[keys.index("teacher_ddim_fd_digits"):])


def test_the_quality_view_shows_the_students_then_the_teacher_then_the_floor_fewest_steps_first():
    by_steps, _ = parent_metrics(quality_table(RECORDS))
    assert quality_columns(by_steps, fd_name="fd_digits") == [
        "distilled_fd_digits_1steps", "distilled_fd_digits_2steps", "distilled_fd_digits_4steps",
        "teacher_ddim_fd_digits_1steps", "teacher_ddim_fd_digits_2steps", "teacher_ddim_fd_digits_4steps",
        "teacher_ddim_fd_digits_8steps", "floor_fd_digits"]


def test_prefect_table_is_the_clis_table_to_four_significant_digits():
    wide = quality_table(RECORDS)
    rows = concise_rows(wide)
    assert [list(r) for r in rows] == [list(summary_view(wide).columns)] * 4  # the CLI's columns, in order
    assert [r["steps"] for r in rows] == [1, 2, 4, 8] and all(isinstance(r["steps"], int) for r in rows)
    assert rows[0]["distilled_fd_digits"] == 20.12  # 20.123456789
    assert rows[0]["distilled_seconds_per_image"] == 0.0007635
    assert rows[3]["distilled_fd_digits"] is None  # no 8-step student: an empty cell, not NaN
    assert rows[2]["floor_fd_digits"] == 1.936


def test_markdown_table_has_a_header_an_alignment_row_and_empty_gaps():
    text = markdown_table([{"steps": 1, "fd": 12.5}, {"steps": 8, "fd": None}])
    assert text.splitlines() == ["| steps | fd |", "|---:|---:|", "| 1 | 12.5 |", "| 8 |  |"]
    assert markdown_table([]) == ""


def test_report_shows_grids_from_a_server_and_says_where_they_are_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("PD_MLFLOW_UI_URL", raising=False)
    server = Tracker(tracking_uri="http://mlflow:5000", experiment="x", journal_path=str(tmp_path / "j.jsonl"))
    grid = "s3://b/p/pipelines/smoke/rounds/03-0001.eval/samples-ddim-0001.png"
    shown = _grid_line("1 step", grid_uri=grid, run_id="abc", tracker=server)
    url = "http://mlflow:5000/get-artifact?path=samples-ddim.png&run_uuid=abc"  # one name in every round
    assert f"![sample grid]({url})" in shown and f"[open the PNG]({url})" in shown
    local = Tracker(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="x",
                    journal_path=str(tmp_path / "j.jsonl"))
    line = _grid_line("1 step", grid_uri="file:///data/store/x.eval/samples-ddim-0001.png", run_id="abc",
                      tracker=local)
    assert "`/data/store/x.eval/samples-ddim-0001.png`" in line and "![" not in line
    assert "http://127.0.0.1:5000/get-artifact?path=samples-ddim.png&run_uuid=abc" in line
    assert _grid_line("1 step", grid_uri=None, run_id="abc", tracker=local) == "- 1 step: no sample grid"


def test_the_reports_headers_drop_the_metric_name_and_snake_case():
    wide = quality_table(RECORDS)
    headers = short_headers(list(summary_view(wide).columns), fd_name="fd_digits")
    assert headers == {"steps": "steps", "distilled_fd_digits": "distilled", "teacher_ddim_fd_digits": "teacher DDIM",
                       "floor_fd_digits": "floor", "distilled_seconds_per_image": "distilled s/image"}
    assert short_headers(["teacher_stochastic_gamma", "distilled_w2_sample_accuracy"], fd_name="fd_digits") == {
        "teacher_stochastic_gamma": "teacher stochastic gamma", "distilled_w2_sample_accuracy": "distilled w2 accuracy"}


def test_a_student_worse_than_the_teachers_ddim_at_the_same_steps_gets_one_warning_line_per_step_count():
    rows = concise_rows(quality_table(RECORDS))  # distilled 20.1.. > teacher DDIM 10.x at 1, 2 and 4 steps
    warnings = worse_than_teacher(rows, fd_name="fd_digits")
    assert [w.split("-step")[0] for w in warnings] == ["the 1", "the 2", "the 4"]
    assert warnings[0] == ("the 1-step student is worse than the teacher's 1-step DDIM (fd_digits 20.12 > 11): "
                           "distil longer (distill.updates_per_round) or from a better teacher")
    better = [{**r, "distilled_fd_digits": None if r["distilled_fd_digits"] is None else 1.0} for r in rows]
    assert worse_than_teacher(better, fd_name="fd_digits") == [] and worse_than_teacher(rows, fd_name=None) == []
    guided = [{"steps": 4, "distilled_w2_fd_digits": 9.0, "teacher_ddim_w2_fd_digits": 8.0,
               "distilled_w0_fd_digits": 7.0, "teacher_ddim_w0_fd_digits": 8.0}]
    (line,) = worse_than_teacher(guided, fd_name="fd_digits")
    assert line.startswith("the 4-step student at w = 2 is worse than the teacher's 4-step DDIM (fd_digits 9 > 8)")


def test_every_rounds_grid_has_one_artifact_name_so_compare_lines_them_up():
    assert grid_artifact_path("s3://b/p/pipelines/x/rounds/03-0001.eval/samples-ddim-0001.png") == "samples-ddim.png"
    assert grid_artifact_path("file:///s/pipelines/x/rounds/01-0004.eval/samples-ddim-0004.png") == "samples-ddim.png"
    assert grid_artifact_path("file:///s/x.eval/samples-ddim-0002-w1.5.png") == "samples-ddim-w1.5.png"


def test_a_registered_versions_description_says_steps_round_pipeline_and_fd():
    from pd_core.config import load_config
    from pd_core.jobs import CheckpointInfo
    from tasks.report import version_description
    from tasks.results import RoundResult

    cfg = load_config(preset="smoke", overrides=["pipeline.name=p1"])
    student = CheckpointInfo(key="pipelines/p1/rounds/03-0001", uri="file:///s/pipelines/p1/rounds/03-0001",
                             sha256="0" * 64, steps=1, round=3, trained=True, train_seconds=1.0, resumed_from=0)
    text = version_description(cfg, RoundResult(student=student, metrics={"fd_digits": 12.345678}), fd_name="fd_digits")
    assert text == ("1-step DDIM sampler of pipeline `p1`: round 3 (2 -> 1 steps). fd_digits 12.35 at "
                    f"{cfg.eval.num_samples} samples (FD in our classifier's feature space; lower is better). "
                    "Checkpoint: file:///s/pipelines/p1/rounds/03-0001")
