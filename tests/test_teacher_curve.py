"""benchmarks/quality/teacher_curve.py on the smoke preset: it trains, snapshots, scores, and a rerun trains nothing."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks.quality import teacher_curve

pytestmark = [pytest.mark.slow]


def test_the_curve_scores_each_milestone_and_a_rerun_reuses_the_snapshots(tmp_path, capsys):
    args = ["--preset", "smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path), "--milestones", "4,8",
            "--set", "teacher.checkpoint_every=2", "--set", "runtime.threads=1"]
    assert teacher_curve.main(args) == 0
    first = pd.read_csv(tmp_path / "teacher_curve.csv")
    assert sorted(first.loc[first.sampler == "teacher_ddim", "updates"].unique()) == [4, 8]
    assert (first.loc[first.sampler == "real_data_floor", "steps"].isna()).all()
    assert (tmp_path / "teacher_curve.png").stat().st_size > 1000
    capsys.readouterr()
    assert teacher_curve.main(args) == 0
    assert "snapshot at" not in capsys.readouterr().out  # nothing trained again
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "teacher_curve.csv"), first)
