"""benchmarks/your_model: its commands are valid ``pd run`` lines and its report judges the targets by the numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.your_model import reproduce
from benchmarks.your_model.report import results_markdown
from flows.cli import build_parser
from tasks.common import resolve_config

FD = "fd_fashion_mnist"


@pytest.mark.parametrize("name", ["fmnist-diffusers", "param-eps", "param-x", "param-v"])
def test_every_benchmark_command_is_a_valid_pd_run_line(name, tmp_path):
    args = build_parser().parse_args(reproduce.commands(tmp_path, extra=[])[name][1:])
    cfg = resolve_config(preset=args.preset, config_path=args.config_path, overrides=args.overrides, name=args.name,
                         storage=args.storage, tracking_uri=args.tracking_uri, teacher_uri=args.teacher_uri)
    assert cfg.pipeline.teacher_uri == f"diffusers:{tmp_path / 'teacher'}"
    assert cfg.data.name == "fashion_mnist" and cfg.data.image_size == 28 and cfg.runtime.threads == 1
    if name == "fmnist-diffusers":
        assert cfg.distill.start_steps == 16 and cfg.distill.student_parameterization == "auto"
    else:
        kind = name.split("-")[1]
        assert cfg.distill.start_steps == 4 and cfg.distill.student_parameterization == kind
        assert cfg.diffusion.weighting == ("snr" if kind == "eps" else "snr_trunc")


def _frame(values: dict[tuple[str, str, int], float]) -> pd.DataFrame:
    rows = [{"preset": p, "sampler": s, "steps": n, "metric": FD, "value": v, "n_samples": 500,
             "seconds_per_image": 0.01} for (p, s, n), v in values.items()]
    return pd.DataFrame(rows, columns=reproduce.COLUMNS)


def test_the_report_judges_each_target_by_the_numbers(tmp_path):
    main = "fmnist-diffusers"
    values = {}
    for n, (theirs, ours, other, distilled) in {16: (20, 20.5, 21, math.nan), 8: (22, 22.1, 23, 21),
                                                 4: (30, 31, 30.5, 29), 2: (60, 61, 62, 65), 1: (150, 150, 149, 40)
                                                 }.items():
        values |= {(main, "diffusers_ddim", n): theirs, (main, "teacher_ddim", n): ours,
                   (main, "teacher_ddim_seed1", n): other}
        if not math.isnan(distilled):
            values[(main, "distilled", n)] = distilled
    for kind, (two, one) in {"eps": (50, 120), "x": (45, 60), "v": (48, 55)}.items():
        values |= {(f"param-{kind}", "distilled", 2): two, (f"param-{kind}", "distilled", 1): one}
    summary = {"fd_name": FD, "floor": {FD: 2.5}, "n_samples": 500, "machine": "test", "commands": {},
               "classifier_accuracy": 0.9, "baseline_seconds": 0.0, "walls": {},
               "teacher_training": {"parameters": 1, "updates": 2, "batch_size": 3, "lr": 1e-3, "seconds": 4.0,
                                    "threads": 1}}
    text = results_markdown(_frame(values), summary, store=Path(tmp_path))
    assert "| distilled below diffusers' DDIM at N=8 | 21 | 22 | yes |" in text
    assert "| distilled below diffusers' DDIM at N=2 | 65 | 60 | no |" in text
    assert "pipeline defaults at N=" not in text  # not measured in this frame: no such target
    assert "| distilled below our trailing DDIM (same noise) at N=4 | 29 | 31 | yes |" in text
    assert "| distilled below our trailing DDIM (same noise) at N=8 | 21 | 22.1 | yes |" in text
    targets = text.split("## Targets")[1].split("## The folder's own DDIM")[0]
    assert "N=16" not in targets  # no distilled 16-step model
    assert "within sampling noise" not in text  # two different samplers: compared, not judged equal
    assert "| 4 | 30 | 31 | -1 | 0.5 |" in text and "| 1 | 150 | 150 | 0 | 1 |" in text
    assert "| 2 | 50 | **45** | 48 |" in text and "| 1 | 120 | 60 | **55** |" in text
