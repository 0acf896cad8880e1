"""Fast end-to-end check of pd_core (issue 2): train a tiny 2-D teacher, distill 8 -> 4 -> 2 -> 1 steps,
and require the distilled N-step sampler to be much closer to the data than the teacher's N-step DDIM.

The full version (64 -> 1 steps, more updates, results file) is ``python benchmarks/core_e2e.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.core_e2e_data import energy_distance

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "core_e2e.py"


def _load():
    """Import benchmarks/core_e2e.py (benchmarks/ is a folder of scripts, not a package)."""
    if "core_e2e" in sys.modules:
        return sys.modules["core_e2e"]
    spec = importlib.util.spec_from_file_location("core_e2e", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["core_e2e"] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_energy_distance_sanity():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 2)), rng.normal(size=(500, 2))
    assert abs(energy_distance(a, b)) < 0.02
    assert energy_distance(a, b + 1.0) > 0.5
    # exact on a tiny case: X = {0, 2}, Y = {1, 1}: 2 E|X-Y| - E|X-X'| - E|Y-Y'| = 2 * 1 - 2 - 0
    x = np.array([[0.0], [2.0]])
    y = np.array([[1.0], [1.0]])
    assert energy_distance(x, y) == pytest.approx(2 * 1.0 - 2.0 - 0.0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_distilled_beats_teacher_ddim_at_same_steps():
    e2e = _load()
    threads = torch.get_num_threads()
    try:
        res = e2e.run(e2e.QUICK, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    rows = {r["steps"]: r for r in res["rows"]}
    assert sorted(rows) == [1, 2, 4]
    summary = {n: (round(r["distilled"], 4), round(r["teacher_ddim"], 4)) for n, r in rows.items()}
    print(f"energy distance (distilled, teacher DDIM) by N: {summary}; teacher 8 steps {res['teacher_full']:.4f}")
    for n in (1, 2):
        # clear margin: at least 2.5x closer to the data than the teacher's DDIM with the same N
        assert rows[n]["distilled"] < rows[n]["teacher_ddim"] / 2.5, summary
    # and distillation lost little relative to the 8-step teacher it started from
    assert rows[1]["distilled"] < 2.0 * res["teacher_full"] + 0.01, (summary, res["teacher_full"])
    assert abs(res["floor"]) < 0.01
