"""benchmarks/quality/ (reproduce.py and the modules it runs on): the results file's exact format, the target
verdicts, the figures, and that the committed results, RESULTS.md and the README's headline agree with each other."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from benchmarks.quality import frames, plots, report_text, runs

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "benchmarks" / "quality"


def _rec(sampler: str, steps: int | None, fd: float, *, gamma: float | None = None, n: int = 400) -> dict:
    return {"sampler": sampler, "steps": steps, "gamma": gamma, "fd_fashion_mnist": fd, "kid_fashion_mnist": fd / 100,
            "n_samples": n, "seconds_per_image": 0.01 * (steps or 0), "model_sha256": "ab" * 32, "model_uri": "file:///x"}


def _records():
    main = [_rec("floor", None, 1.5)]
    for n, t, d in [(8, 20.0, 10.0), (4, 40.0, 12.0), (2, 80.0, 14.0), (1, 160.0, 18.0)]:
        main += [_rec("teacher_ddim", n, t), _rec("teacher_stochastic", n, t * 1.5, gamma=0.0),
                 _rec("teacher_stochastic", n, t * 1.2, gamma=1.0), _rec("distilled", n, d)]
    main += [_rec("teacher_ddim", 16, 11.0), _rec("teacher_stochastic", 16, 13.0, gamma=1.0)]
    fast = [_rec("teacher_ddim", 8, 20.0)] + [_rec("distilled", n, v)
                                              for n, v in [(8, 11.0), (4, 15.0), (2, 19.0), (1, 25.0)]]
    return main, fast


def _floor(n: int = 400) -> dict:
    return {"sampler": "floor", "steps": None, "fd_fashion_mnist": 1.5, "kid_fashion_mnist": 0.001,
            "kid_fashion_mnist_std": 0.01, "precision": 0.85, "recall": 0.9, "n_samples": n,
            "seconds_per_image": 0.0}


def test_results_frame_has_exactly_the_issue_columns_and_samplers():
    main, fast = _records()
    df = frames.results_frame(preset="fmnist-cpu", main=main, fast=fast)
    assert list(df.columns) == ["preset", "sampler", "steps", "metric", "value", "n_samples", "seconds_per_image"]
    assert set(df.sampler) == {"teacher_ddim", "teacher_stochastic", "distilled", "distilled_fast"}  # no floor given
    assert (df.preset == "fmnist-cpu").all()
    fd = df[df.metric == "fd_fashion_mnist"]
    # best gamma per step count; the fast pipeline's (imported) teacher rows are not duplicated
    assert fd[(fd.sampler == "teacher_stochastic") & (fd.steps == 4)].value.tolist() == [48.0]
    assert df[(df.sampler == "teacher_stochastic") & (df.metric == "gamma")].value.tolist() == [1.0] * 5
    assert len(fd[fd.sampler == "teacher_ddim"]) == 5
    assert fd[fd.sampler == "distilled_fast"].set_index("steps").value.to_dict() == {1: 25.0, 2: 19.0, 4: 15.0, 8: 11.0}


def test_floor_rows_carry_every_floor_metric_at_the_same_n_with_empty_steps(tmp_path):
    main, fast = _records()
    df = frames.results_frame(preset="fmnist-cpu", main=main, fast=fast, floor=_floor())
    floor = df[df.sampler == "real_data_floor"]
    assert floor.set_index("metric").value.to_dict() == {
        "fd_fashion_mnist": 1.5, "kid_fashion_mnist": 0.001, "kid_fashion_mnist_std": 0.01, "precision": 0.85,
        "recall": 0.9}
    assert floor.steps.isna().all() and floor.seconds_per_image.isna().all() and (floor.n_samples == 400).all()
    assert list(df.sampler.unique())[-1] == "real_data_floor"  # after the samplers' rows
    assert frames.floor_value(df, metric="fd_fashion_mnist") == 1.5
    assert frames.floor_value(frames.results_frame(preset="p", main=main, fast=fast), metric="fd_fashion_mnist") is None
    # the floor stays out of the steps x sampler table, also after a round trip through the CSV
    df.to_csv(tmp_path / "r.csv", index=False)
    back = pd.read_csv(tmp_path / "r.csv")
    assert list(back.columns) == frames.COLUMNS and back[back.sampler == "real_data_floor"].steps.isna().all()
    w = frames.wide(back, metric="fd_fashion_mnist")
    assert list(w.columns) == ["teacher_ddim", "teacher_stochastic", "distilled", "distilled_fast"]
    assert list(w.index) == [16, 8, 4, 2, 1] and w.index.dtype == "int64"


def test_target_verdicts_follow_the_numbers():
    main, fast = _records()
    df = frames.results_frame(preset="p", main=main, fast=fast, floor=_floor())
    w = frames.wide(df, metric=frames.fd_metric(df))
    checks = {c["target"]: c for c in frames.target_checks(w, start_steps=16, floor=1.5)}
    assert all(checks[f"distilled beats teacher DDIM at N={n}"]["met"] for n in (8, 4, 2, 1))
    within = checks["distilled 4-step within 1.2x of teacher DDIM at 16 steps"]
    assert math.isclose(within["ratio"], 12.0 / 11.0) and within["met"]
    near = checks["teacher DDIM at 16 steps within 4x of the real-data floor"]
    assert math.isclose(near["ratio"], 11.0 / 1.5) and not near["met"]  # 7.3x the floor
    assert frames.target_checks(w, start_steps=16, floor=2.75)[0]["met"]  # exactly 4x: met
    w.loc[4, "distilled"] = 11.0 * 1.21  # just outside 1.2x, and still better than DDIM at 4 steps
    checks = {c["target"]: c for c in frames.target_checks(w, start_steps=16, floor=None)}
    assert not checks["distilled 4-step within 1.2x of teacher DDIM at 16 steps"]["met"]
    assert checks["distilled beats teacher DDIM at N=4"]["met"]
    assert not any("floor" in name for name in checks)  # no floor measured: no verdict on it


def test_headline_table_bolds_wins_and_names_the_metric_honestly():
    main, fast = _records()
    df = frames.results_frame(preset="p", main=main, fast=fast)
    text = report_text.headline_markdown(df, metric="fd_fashion_mnist", floor=1.5, n_samples=400, gammas={4: 1.0})
    assert "| 4 | 40 | 48 (gamma 1) | **12** | 15 |" in text
    assert "not Inception FID" in text and "floor at the same N: 1.5" in text


def test_plot_and_grids_write_pngs(tmp_path):
    import io

    main, fast = _records()
    df = frames.results_frame(preset="p", main=main, fast=fast)
    plots.plot_quality(df, metric="fd_fashion_mnist", floor=1.5, path=tmp_path / "q.png", title="t")
    assert Image.open(tmp_path / "q.png").size[0] > 300
    buf = io.BytesIO()
    Image.new("L", (34, 34), 128).save(buf, format="PNG")
    plots.plot_grids({("teacher_ddim", 1): buf.getvalue(), ("distilled", 1): buf.getvalue()}, steps=(1, 2),
                  path=tmp_path / "g.png", title="t")
    assert Image.open(tmp_path / "g.png").size[0] > 200


def test_readme_block_is_replaced_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    start, end = report_text.README_START, report_text.README_END
    readme.write_text(f"# x\n\nbefore\n{start}\nold\n{end}\nafter\n")
    report_text.update_readme(readme, "new table")
    assert readme.read_text() == f"# x\n\nbefore\n{start}\nnew table\n{end}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="lacks the markers"):
        report_text.update_readme(readme, "x")


def test_rebuilt_results_md_keeps_the_hand_written_notes():
    old = "# old generated\n\n| 1 | 9 |\n\n## Notes\n\nWhy the 1-step student lags.\n"
    assert report_text.with_notes("# new\n\n| 1 | 3 |", old=old) == \
        "# new\n\n| 1 | 3 |\n\n## Notes\n\nWhy the 1-step student lags.\n"
    assert report_text.with_notes("# new\n", old="") == "# new\n"


def test_pipeline_commands_share_store_tracking_and_teacher(tmp_path):
    cmds = runs.pipeline_commands(preset="fmnist-cpu", work=tmp_path)
    main, fast = cmds["distilled"], cmds["distilled_fast"]
    assert main[:4] == ["pd", "run", "--preset", "fmnist-cpu"]
    assert fast[fast.index("--teacher-uri") + 1] == f"file://{tmp_path}/store/pipelines/fmnist-cpu/teacher"
    assert "distill.fast=true" in fast and fast[fast.index("--name") + 1] == "fmnist-cpu-fast"
    for flag in ("--storage", "--tracking-uri"):
        assert main[main.index(flag) + 1] == fast[fast.index(flag) + 1]
    assert "--teacher-uri" not in main
    imported = runs.pipeline_commands(preset="fmnist-cpu", work=tmp_path, teacher_uri="file:///t/teacher")
    main = imported["distilled"]
    assert main[main.index("--teacher-uri") + 1] == "file:///t/teacher"  # the main run imports; fast takes main's
    assert imported["distilled_fast"] == fast
    assert runs.report_command(preset="fmnist-cpu", work=runs.REPO / "runs" / "quality", teacher_uri=None) == \
        "python -m benchmarks.quality.reproduce --preset fmnist-cpu"
    assert runs.report_command(preset="p", work=tmp_path, teacher_uri="file:///t") == \
        f"python -m benchmarks.quality.reproduce --preset p --work {tmp_path} --teacher-uri file:///t"


@pytest.mark.skipif(not (QUALITY / "results.csv").exists(), reason="no committed results yet")
def test_committed_results_match_results_md_and_readme():
    df = pd.read_csv(QUALITY / "results.csv")
    assert list(df.columns) == frames.COLUMNS
    assert set(df.sampler) <= {*frames.SAMPLERS, frames.FLOOR_SAMPLER}
    floor = df[df.sampler == frames.FLOOR_SAMPLER]
    assert len(floor) and floor.steps.isna().all() and (floor.n_samples == df.n_samples.max()).all()
    metric = frames.fd_metric(df)
    n = int(df.n_samples.max())
    table = report_text.headline_markdown(df, metric=metric, floor=None, n_samples=n, gammas={}).split("\n\n")[0]
    readme, results_md = (ROOT / "README.md").read_text(), (QUALITY / "RESULTS.md").read_text()
    block = readme.split(report_text.README_START, 1)[1].split(report_text.README_END, 1)[0]
    for line in table.splitlines()[2:]:  # every data row, number by number (gamma annotations aside)
        cells = [c.split(" (gamma")[0] for c in line.strip("|").split("|")]
        for doc in (block, results_md):
            row = next((r for r in doc.splitlines() if r.startswith(f"| {cells[0].strip()} |")), None)
            assert row is not None, line
            assert [c.split(" (gamma")[0].strip() for c in row.strip("|").split("|")] == [c.strip() for c in cells]
    for png in ("quality_vs_steps.png", "samples.png"):
        assert Image.open(QUALITY / png).size[0] > 300


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_reproduce_end_to_end_on_the_smoke_preset(tmp_path):
    """The one command, on the smoke preset: two real `pd run`s (main, fast ablation importing its teacher),
    then every results file, from the store and MLflow they wrote."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PD_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)  # embedded defaults, as the documented command runs
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality.reproduce", "--preset", "smoke",
                           "--work", str(work), "--out", str(out), "--no-readme"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns) == frames.COLUMNS
    fd = df[df.metric == "fd_digits"]
    assert len(fd[fd.sampler == "real_data_floor"]) == 1 and fd[fd.sampler == "real_data_floor"].steps.isna().all()
    assert sorted(fd[fd.sampler == "teacher_ddim"].steps) == [1, 2, 4, 8]
    assert sorted(fd[fd.sampler == "distilled"].steps) == sorted(fd[fd.sampler == "distilled_fast"].steps) == [1, 2, 4]
    assert (fd.n_samples == 200).all()  # the floor at the same N
    # the fast pipeline imported the main teacher and re-measured nothing of it: one record per measurement
    summary = json.loads((out / "results.json").read_text())
    assert summary["floor"] and summary["floor"][0]["n_samples"] == 200
    assert summary["train_seconds"]["smoke-fast"]["teacher"] is None  # imported, not trained
    assert summary["train_seconds"]["smoke"]["teacher"] > 0
    assert set(summary["pipeline_wall_seconds"]) == {"smoke", "smoke-fast"}
    text = (out / "RESULTS.md").read_text()
    assert "pd run --preset smoke" in text and "distill.fast=true" in text and "## Targets" in text
    for png in ("quality_vs_steps.png", "samples.png"):
        assert Image.open(out / png).size[0] > 100
    assert Image.open(out / "teacher_8_steps.png").size == (42, 42)  # 4 x 4 images of 8 x 8, 2-px padding
    # a rerun trains nothing and gives the same table
    again = subprocess.run([sys.executable, "-m", "benchmarks.quality.reproduce", "--preset", "smoke", "--work",
                            str(work), "--out", str(out), "--no-readme"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "teacher step" not in again.stdout and "complete and verified: skipped" in again.stdout
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), df)
