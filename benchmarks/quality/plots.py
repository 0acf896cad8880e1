"""The quality benchmark's figures: metric vs steps (paper Fig. 4) and the sample grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from benchmarks.quality.frames import LABELS, wide


def plot_quality(df: pd.DataFrame, *, metric: str, floor: float | None, path: Path, title: str) -> None:
    """Metric vs steps on a log-2 axis: teacher DDIM, teacher stochastic, distilled (paper Fig. 4);
    the fast ablation dashed and the real-vs-real floor dotted, for reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = wide(df, metric=metric).sort_index()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = {"teacher_ddim": dict(marker="s", color="tab:blue"),
              "teacher_stochastic": dict(marker="^", color="tab:orange"),
              "distilled": dict(marker="o", color="tab:green", linewidth=2.2),
              "distilled_fast": dict(marker="o", color="tab:green", linestyle="--", alpha=0.6, markersize=4)}
    for sampler in w.columns:
        series = w[sampler].dropna()
        ax.plot(series.index, series.values, label=LABELS[sampler], **styles[sampler])
    if floor is not None:
        ax.axhline(floor, color="grey", linestyle=":", label="real vs real (floor)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(w.index))
    ax.set_xticklabels([str(s) for s in w.index])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(metric + ("" if metric == "fid" else " (FD, classifier features)"))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_grids(grids: Mapping[tuple[str, int], bytes], *, steps: Sequence[int], path: Path, title: str) -> None:
    """Rows teacher DDIM / distilled, one column per step count, from the store's grid PNGs."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [("teacher_ddim", "teacher, DDIM"), ("distilled", "distilled")]
    fig, axes = plt.subplots(len(rows), len(steps), figsize=(2.6 * len(steps), 2.9 * len(rows)), dpi=100,
                             layout="constrained")
    for i, (kind, label) in enumerate(rows):
        for j, n in enumerate(steps):
            ax = axes[i][j]
            ax.axis("off")
            png = grids.get((kind, n))
            if png is not None:
                ax.imshow(Image.open(io.BytesIO(png)).convert("L"), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{label}, {n} step{'s' if n > 1 else ''}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    Image.open(buf).convert("L").save(path, optimize=True)  # grey images: a third of the RGBA file
