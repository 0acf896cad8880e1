"""The generated top of benchmarks/your_model/RESULTS.md: tables from results.csv and facts from results.json."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

MAIN = "fmnist-diffusers"
SAMPLERS = {"diffusers_ddim": "diffusers' DDIM",
            "teacher_ddim": "our trailing DDIM (same noise)", "teacher_ddim_seed1": "our DDIM (other noise seed)",
            "distilled": "distilled", "distilled_unclipped": "distilled, unclipped",
            "distilled_eps_from_clipped_x": "distilled, eps from the clipped x"}


def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def _wide(df: pd.DataFrame, *, preset: str, metric: str) -> pd.DataFrame:
    sub = df[(df["preset"] == preset) & (df["metric"] == metric) & (df["sampler"] != "real_data_floor")]
    return sub.pivot_table(index="steps", columns="sampler", values="value", aggfunc="first").sort_index(
        ascending=False)


def _stage_seconds(store: Path) -> list[tuple[str, str, float]]:
    """(pipeline, checkpoint, training seconds) from the manifests (the run that trained them)."""
    out = []
    for manifest in sorted((store / "pipelines").glob("*/rounds/*/manifest.json")):
        doc = json.loads(manifest.read_text())
        out.append((doc["pipeline"], manifest.parent.name, float(doc.get("train_seconds", 0.0))))
    return out


def results_markdown(df: pd.DataFrame, summary: Mapping, *, store: Path) -> str:
    """Machine, commands, teacher recipe, the main table, the targets, the parameterization study, wall times."""
    fd = summary["fd_name"]
    floor = summary["floor"]
    teach = summary["teacher_training"]
    w = _wide(df, preset=MAIN, metric=fd)
    lines = ["# Distill your own model: a diffusers-trained Fashion-MNIST teacher", "",
             "Produced by `python -m benchmarks.your_model.reproduce` (idempotent; `--report-only` rebuilds this "
             "file from a finished work folder), which runs:", ""]
    lines += ["    python -m benchmarks.your_model.train_teacher --out <work>/teacher"]
    lines += [f"    {c}" for c in summary["commands"].values()]
    lines += ["", f"- **Machine:** {summary['machine']}; no GPU; shared with other jobs (timings are noisy).",
              f"- **Teacher:** a diffusers `UNet2DModel` (28x28x1; 16/32/64 channels, attention at 7x7; "
              f"{teach['parameters']:,} parameters) trained by `train_teacher.py` with diffusers' recipe "
              f"(`DDPMScheduler`, 1000 linear-beta timesteps, epsilon MSE, `EMAModel` with warm-up): "
              f"{teach['updates']} updates of {teach['batch_size']} images, lr {teach['lr']}, "
              f"{teach['seconds']:.0f} s on {teach['threads']} thread(s). Saved with `save_pretrained`, imported "
              f"with `--teacher-uri diffusers:<folder>`.",
              f"- **Metric:** `{fd}` = FD in our classifier's feature space (not Inception FID; classifier test "
              f"accuracy {_fmt(summary.get('classifier_accuracy'), 4)}), {summary['n_samples']} samples vs the "
              f"10k test split, the same noise for every sampler (eval seed 0); KID, precision and recall are in "
              f"results.csv.",
              f"- **Floor:** real vs real at the same N ({summary['n_samples']} training images vs the test split): "
              f"{fd} {_fmt(floor[fd])}.",
              "- **Samplers:** `diffusers_ddim` = what `DDIMPipeline.from_pretrained(teacher folder)"
              "(num_inference_steps=N)` does with its defaults (the folder's own scheduler settings: spacing, "
              "`steps_offset`, `set_alpha_to_one`, `clip_sample`; x0 clipped, the model's eps kept), same noise; "
              "`teacher_ddim` = our DDIM over the imported teacher (diffusers' trailing integer timesteps, x_hat "
              "clipped, the model's eps kept, as the stock pipeline over an export); `teacher_ddim_seed1` = ours "
              "with another noise seed (how much one number moves with the noise); `distilled` = the N-step "
              "student (x clipped, eps kept); `distilled_unclipped`, `distilled_eps_from_clipped_x` = the same "
              "student unclipped, and with eps re-derived from the clipped x (the clipping choice).",
              "", f"## Quality vs steps ({fd}, lower is better)", "",
              "| steps | " + " | ".join(SAMPLERS[s] for s in SAMPLERS if s in w.columns) + " |",
              "|---:|" + "---:|" * sum(s in w.columns for s in SAMPLERS)]
    for n in w.index:
        cells = []
        for s in (s for s in SAMPLERS if s in w.columns):
            v = w.at[n, s]
            bold = s == "distilled" and "diffusers_ddim" in w.columns and not math.isnan(v) and \
                v < w.at[n, "diffusers_ddim"]
            cells.append(f"**{_fmt(v)}**" if bold else _fmt(v))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: the distilled sampler beats diffusers' DDIM at the same number of steps.", "",
              "## Targets", "", "| target | value | reference | met |", "|---|---:|---:|---|"]
    for n in (s for s in w.index if s <= 8):
        for ref in (r for r in ("diffusers_ddim", "teacher_ddim") if r in w.columns):
            d, r = w.at[n, "distilled"], w.at[n, ref]
            lines.append(f"| distilled below {SAMPLERS[ref]} at N={n} | {_fmt(d)} | {_fmt(r)} | "
                         f"{'yes' if d < r else 'no'} |")
    lines += ["", "## The folder's own DDIM vs trailing spacing", "",
              "What the folder's scheduler settings cost the user's own `DDIMPipeline` at few steps: its DDIM "
              "against ours with diffusers' trailing timesteps, the same teacher and noise, beside how much one "
              "number moves between noise seeds (not a target: they are different samplers).", "",
              "| steps | diffusers' DDIM (folder's settings) | our trailing DDIM | difference | across noise seeds |",
              "|---:|---:|---:|---:|---:|"]
    for n in w.index:
        ours, theirs, other = w.at[n, "teacher_ddim"], w.at[n, "diffusers_ddim"], w.at[n, "teacher_ddim_seed1"]
        lines.append(f"| {n} | {_fmt(theirs)} | {_fmt(ours)} | {_fmt(theirs - ours)} | {_fmt(abs(ours - other))} |")
    lines += ["", "## Parameterization of the students of an eps teacher (1-2 steps)", "",
              "The same teacher distilled 4 -> 2 -> 1 (80 updates per round) with eps, x and v students "
              "(eps with weighting `snr`, i.e. its own MSE; x and v with the paper's truncated SNR).", "",
              "| steps | eps | x | v |", "|---:|---:|---:|---:|"]
    study = {k: _wide(df, preset=f"param-{k}", metric=fd) for k in ("eps", "x", "v")}
    for n in (2, 1):
        vals = {k: (t.at[n, "distilled"] if n in t.index else float("nan")) for k, t in study.items()}
        best = min((v, k) for k, v in vals.items() if not math.isnan(v))[1] if vals else None
        lines.append(f"| {n} | " + " | ".join(f"**{_fmt(v)}**" if k == best else _fmt(v) for k, v in vals.items())
                     + " |")
    if summary.get("grids"):
        lines += ["", "## Samples (the evaluation's first 64 noises, the same for every grid)", ""]
        lines += [f"![{g}](grids/{g})" for g in summary["grids"]]
    lines += ["", "## Training seconds (from the checkpoints' manifests)", "", "| pipeline | round | seconds |",
              "|---|---|---:|"]
    lines += [f"| {p} | {r} | {s:.0f} |" for p, r, s in _stage_seconds(store)]
    walls = summary.get("walls") or {}
    if walls:
        lines += ["", "Wall seconds of each stage (first run that did the work): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()) + f"; diffusers' DDIM and the second "
                  f"noise seed {summary['baseline_seconds']:.0f} s in the invocation that measured them."]
    return "\n".join(lines) + "\n"
