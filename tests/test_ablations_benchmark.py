"""benchmarks/ablations: the full-size sweeps resolve (dry run), the seed spread is computed right, the tiny
mode runs end to end on the embedded server (smoke preset, 2 updates-per-round factors x 2 seeds)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.ablations.reproduce import seed_spread

ROOT = Path(__file__).resolve().parents[1]


def _reproduce(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in ("PD_DEBUG",)}
    env.update(PD_HOME=str(home), PYTHONPATH=str(ROOT), DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run([sys.executable, "-m", "benchmarks.ablations.reproduce", *args], cwd=home, env=env,
                          capture_output=True, text=True, timeout=800)


def test_the_seed_spread_is_the_mean_and_std_over_seeds_and_of_the_paired_difference() -> None:
    comparison = pd.DataFrame({"distill.fast_factor": ["1", "1", "1", "5", "5", "5"],
                               "pipeline.seed": ["0", "1", "2", "0", "1", "2"],
                               "distilled_fd_x_1steps": [10.0, 12.0, 14.0, 13.0, 13.0, 19.0]})
    spread = seed_spread(comparison, fd_name="fd_x").set_index("fast_factor")
    fast = spread.loc["5"]
    assert fast["seeds"] == 3 and fast["fd_x_mean"] == pytest.approx(15.0)
    assert fast["fd_x_std"] == pytest.approx(math.sqrt(((13 - 15) ** 2 + (13 - 15) ** 2 + (19 - 15) ** 2) / 2))
    assert fast["diff_vs_1x_mean"] == pytest.approx((3 + 1 + 5) / 3)  # paired by seed: 3, 1, 5
    assert fast["diff_vs_1x_std"] == pytest.approx(2.0)
    assert spread.loc["1", "diff_vs_1x_mean"] == 0.0


def test_ablation_1_at_full_size_resolves_every_point(tmp_path: Path) -> None:
    proc = _reproduce("--ablation", "1", "--dry-run", "--work", str(tmp_path / "work"), home=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "11 points, 11 teacher(s)" in proc.stdout  # 4 x 3 minus eps with snr_trunc; every teacher its own
    assert "parameterization-eps.weighting-snr_trunc" not in proc.stdout


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_ablation_2_tiny_runs_and_reports_the_spread_over_seeds(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = _reproduce("--ablation", "2", "--tiny", "--seeds", "0,1", "--work", str(work), home=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 points finished" in proc.stdout
    assert proc.stdout.count("shares the teacher of") == 2  # factor 5 distils its seed's teacher
    results = pd.read_csv(work / "ablation2_results.csv")
    assert {"point", "distill.fast_factor", "pipeline.seed", "sampler", "steps", "metric", "value"} <= set(results)
    assert results["point"].nunique() == 4
    summary = pd.read_csv(work / "ablation2_summary.csv")
    assert set(summary["fast_factor"]) == {1, 5} and set(summary["seeds"]) == {2}
    assert summary["fd_digits_std"].notna().all()
