"""benchmarks/text_to_image/reproduce.py: the results frame (the quality format plus w, the same-UNet-calls rows read
from ``unet_calls``), the target verdicts against hand-computed numbers, the README markers, bad arguments, and the
``--tiny`` path end to end twice (a real ``pd run`` of a tiny Stable Diffusion-style teacher; the rerun trains
nothing)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from benchmarks.text_to_image import reproduce as rp

WEIGHTS = (0.0, 2.0)
FOLDER = "f" * 64
# FD of (sampler, w) at steps 8, 4, 2, 1; the student misses at N=4, w=0 (12.5 > 12) and at N=2, w=2 (18 > 16)
FD = {("teacher_ddim", 0.0): (10.0, 12.0, 20.0, 40.0), ("distilled", 0.0): (9.0, 12.5, 15.0, 30.0),
      ("teacher_ddim", 2.0): (8.0, 10.0, 16.0, 35.0), ("distilled", 2.0): (7.0, 9.0, 18.0, None)}


def _rec(sampler: str, steps: int, w: float, fd: float) -> dict:
    calls = steps * (2 if sampler != "distilled" and w > 0 else 1)
    return {"sampler": sampler, "steps": steps, "gamma": None, "w": w, "unet_calls": calls, "fd_captions": fd,
            "kid_captions": fd / 100, "prompt_accuracy": 0.8 if sampler == "teacher_ddim" else 0.7, "n_samples": 100,
            "seconds_per_image": 0.01 * steps, "clip_sample": False, "teacher_folder_sha256": FOLDER,
            "model_sha256": "ab" * 32, "model_uri": "file:///x"}


def _records() -> list[dict]:
    rows = []
    for (sampler, w), fds in FD.items():
        for steps, fd in zip((8, 4, 2, 1), fds, strict=True):
            if fd is not None:  # the 1-step student at w = 2 was not measured
                rows.append(_rec(sampler, steps, w, fd))
                if sampler == "teacher_ddim":
                    rows.append(_rec("diffusers_ddim", steps, w, fd + 0.01))
    rows.append({"sampler": "floor", "steps": None, "fd_captions": 0.5, "n_samples": 100})
    return rows


def _frame() -> pd.DataFrame:
    return rp.results_frame(preset="text-to-image-cpu", records=_records(), weights=WEIGHTS)


def test_the_results_frame_is_the_quality_format_plus_w_with_the_same_calls_rows_read_from_unet_calls():
    df = _frame()
    assert list(df.columns) == rp.COLUMNS
    assert set(df.sampler) == {"teacher_ddim", "diffusers_ddim", "distilled", rp.SAME_CALLS}
    assert {"fd_captions", "prompt_accuracy", "unet_calls", "kid_captions"} <= set(df.metric)
    assert "clip_sample" not in set(df.metric) and set(df.w) == set(WEIGHTS)
    assert rp.value(df, sampler="distilled", steps=4, w=0.0, metric="fd_captions") == 12.5
    assert rp.results_frame(preset="p", records=_records(), weights=(2.0,)).w.unique().tolist() == [2.0]
    assert rp.value(df, sampler="teacher_ddim", steps=8, w=2.0, metric="unet_calls") == 16
    # w = 2: the N-step student against the teacher at N/2 steps (its 2 calls a step), none for N = 1
    same = {(w, n): (rp.value(df, sampler=rp.SAME_CALLS, steps=n, w=w, metric="teacher_steps"),
                     rp.value(df, sampler=rp.SAME_CALLS, steps=n, w=w, metric="fd_captions")) for w in WEIGHTS
            for n in (8, 4, 2)}
    assert same[(2.0, 8)] == (4, 10.0) and same[(2.0, 4)] == (2, 16.0) and same[(2.0, 2)] == (1, 35.0)
    assert same[(0.0, 8)] == (8, 10.0) and same[(0.0, 2)] == (2, 20.0)
    assert math.isnan(rp.value(df, sampler=rp.SAME_CALLS, steps=1, w=2.0, metric="fd_captions"))
    assert rp.same_calls_pairs(df)[4:] == [
        {"w": 2.0, "student_steps": 8, "teacher_steps": 4, "unet_calls": 8},
        {"w": 2.0, "student_steps": 4, "teacher_steps": 2, "unet_calls": 4},
        {"w": 2.0, "student_steps": 2, "teacher_steps": 1, "unet_calls": 2}]


def test_a_student_record_without_a_teacher_at_its_calls_gets_no_same_calls_row():
    rows = [_rec("teacher_ddim", n, 1.0, 10.0 * n) for n in (1, 2)]  # 2 and 4 calls at w = 1
    rows += [_rec("distilled", n, 1.0, float(n)) for n in (4, 2, 1)]
    same = rp.same_calls_records(rows)
    assert [(r["steps"], r["teacher_steps"], r["unet_calls"], r["fd_captions"]) for r in same] == [
        (4, 2, 4, 20.0), (2, 1, 2, 10.0)]  # the 1-step student: no teacher makes 1 call at w > 0
    assert all(r["sampler"] == rp.SAME_CALLS for r in same)


def test_target_verdicts_follow_hand_computed_numbers_at_every_w():
    checks = rp.target_checks(_frame(), metric="fd_captions", start_steps=8, weights=WEIGHTS,
                              student_steps=[1, 2, 4, 8])
    assert len(checks) == 2 * 5
    by = {(c["target"], c["w"]): c for c in checks}
    within = "4-step student within 1.2x of the guided teacher's DDIM at 8 steps"
    assert by[(within, 0.0)]["ratio"] == pytest.approx(12.5 / 10.0) and not by[(within, 0.0)]["met"]  # 1.25 > 1.2
    assert by[(within, 2.0)]["ratio"] == pytest.approx(9.0 / 8.0) and by[(within, 2.0)]["met"]
    below = "student below the guided teacher's DDIM at N={}".format
    expected = {(8, 0.0): True, (4, 0.0): False, (2, 0.0): True, (1, 0.0): True,
                (8, 2.0): True, (4, 2.0): True, (2, 2.0): False, (1, 2.0): False}
    assert {(n, w): by[(below(n), w)]["met"] for n, w in expected} == expected
    assert by[(below(2), 2.0)]["distilled"] == 18.0 and by[(below(2), 2.0)]["teacher_ddim"] == 16.0
    missing = by[(below(1), 2.0)]
    assert missing["distilled"] is None and missing["ratio"] is None and missing["note"] == "not measured"
    assert by[(below(8), 0.0)]["distilled_prompt_accuracy"] == 0.7
    assert by[(below(8), 0.0)]["teacher_prompt_accuracy"] == 0.8
    json.dumps(checks, allow_nan=False)  # results.json stays strict JSON


def test_the_steps_table_bolds_the_student_where_it_is_below_the_teacher_at_the_same_n():
    table = rp.steps_markdown(_frame(), metric="fd_captions", w=2.0)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert list(rows) == ["8", "4", "2", "1"]
    assert "**7 (0.70), 8 calls**" in rows["8"] and "10 (0.80), 8 calls: 4 steps" in rows["8"]
    assert "8 (0.80), 16 calls" in rows["8"] and "**" not in rows["2"]
    compact = rp.compact_markdown(_frame(), metric="fd_captions", start_steps=8, weights=WEIGHTS)
    assert "| 12.5 (0.7) |" in compact  # the guided benchmark's layout, prompt accuracy in brackets


def test_overrides_quote_only_what_yaml_would_misread_and_the_shown_command_keeps_quotes_intact():
    assert rp.pipeline_overrides(data="runs/text_to_image/data") == ["data.url=runs/text_to_image/data"]
    assert rp.pipeline_overrides(data="null")[0] == 'data.url="null"'
    tiny = rp.pipeline_overrides(data="d", tiny=True, extra=["runtime.threads=1"])
    assert f"pipeline.name={rp.TINY_NAME}" in tiny and tiny[-1] == "runtime.threads=1"
    assert rp.shown(["pd", "--set", 'data.url="null"', "--set", "x=[0, 2]"]) == \
        """pd --set 'data.url="null"' --set "x=[0, 2]\""""


def test_the_readme_block_goes_between_the_markers_and_is_skipped_with_one_line_without_them(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{rp.README_START}\nold\n{rp.README_END}\nbottom\n")
    assert rp.update_readme(readme, "new block")
    assert readme.read_text() == f"top\n{rp.README_START}\nnew block\n{rp.README_END}\nbottom\n"
    readme.write_text("no markers")
    assert not rp.update_readme(readme, "x") and readme.read_text() == "no markers"
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_a_missing_teacher_or_data_folder_or_tiny_with_a_teacher_exits_2_with_one_line(tmp_path, capsys):
    for argv, mentions in [(["--teacher", str(tmp_path / "none")], "model_index.json"),
                           (["--teacher", str(tmp_path), "--data", str(tmp_path)], "metadata.jsonl"),
                           (["--tiny", "--teacher", str(tmp_path)], "--tiny makes its own")]:
        if argv[1] == str(tmp_path):
            (tmp_path / "model_index.json").write_text("{}")
        with pytest.raises(SystemExit) as exc:
            rp.main(["--work", str(tmp_path / "w"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and mentions in err[0]
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_tiny_benchmark_runs_end_to_end_and_a_rerun_trains_nothing(tmp_path, prefect_api, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the session's Prefect server, not one per pd run
    monkeypatch.setenv("PD_HOME", str(tmp_path / "home"))
    work, out = tmp_path / "work", tmp_path / "work" / "report"
    rp.main(["--tiny", "--work", str(work)])
    first = capsys.readouterr().out
    assert "saved the Stable Diffusion-style pipeline" in first and "guide-distill step 2/2" in first
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns) == rp.COLUMNS
    assert set(df.sampler) == {"teacher_ddim", "diffusers_ddim", rp.SAME_CALLS, "distilled"}
    assert {"fd_captions", "prompt_accuracy", "unet_calls"} <= set(df.metric) and set(df.w) == {0.0, 2.0}
    fd = df[df.metric == "fd_captions"]
    assert sorted(fd[(fd.sampler == "distilled") & (fd.w == 2.0)].steps) == [1, 2, 4, 8]
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["targets"]) == 2 * 5 and {"target", "w", "distilled", "teacher_ddim", "ratio", "met",
                                                 "distilled_prompt_accuracy"} <= set(summary["targets"][0])
    assert {"w": 2.0, "student_steps": 8, "teacher_steps": 4, "unet_calls": 8} in summary["same_calls_pairs"]
    assert summary["floor"]["fd_captions"] > 0 and summary["pipeline_wall_seconds"][rp.TINY_NAME]
    text = (out / "RESULTS.md").read_text()
    assert "pd run --preset text-to-image-cpu" in text and "## Targets" in text and "## w = 2" in text
    from PIL import Image

    assert Image.open(out / "samples.png").size[0] > 300
    records = sorted((work / "store" / "evals").glob("*/t2i-distilled-0004-w2-*.json"))
    assert len(records) == 1  # a record of other evaluation settings (another eval hash) must not be read:
    stale = records[0].with_name(records[0].name.replace("-w2-", "-w2-000000000000-x"))
    stale.write_text(json.dumps({**json.loads(records[0].read_text()), "fd_captions": 0.0}))
    rp.main(["--tiny", "--work", str(work)])
    second = capsys.readouterr().out
    assert second.count("complete and verified: skipped") == 5  # teacher, stage 1, three rounds
    assert "saved the Stable Diffusion-style pipeline" not in second and " step 1/" not in second
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), df)
