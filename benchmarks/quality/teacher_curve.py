"""Teacher quality against training updates on Fashion-MNIST: where more teacher updates stop paying.

    python -m benchmarks.quality.teacher_curve --work .pd/teacher-curve            # ~2.5 h on one core
    python -m benchmarks.quality.teacher_curve --work .pd/teacher-curve --report-only

One teacher run of the ``fmnist-cpu`` architecture and optimiser (``--set`` overrides apply), trained
to the largest milestone with the project's own training loop; at each milestone its EMA weights
are saved as a checkpoint and scored with the pipeline's evaluation (``eval`` section of the preset:
the same classifier features, N, noise seed and reference split as the pipeline's tables) with
DDIM at the preset's start steps. The EMA is bias-corrected at each milestone,
``ema_hat = (ema - d^n w_0) / (1 - d^n)``, so an early milestone is not dragged towards the
random initial weights ``w_0`` (at the end of a long run, d^n is negligible and ema_hat = ema).
The run resumes after a kill (in-run state every ``teacher.checkpoint_every`` updates).

Writes ``teacher_curve.csv`` (updates, metric, value, n_samples, train_seconds) and
``teacher_curve.png`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from pd_core import evaluation, jobs, lineage
from pd_core.config import Config, load_config
from pd_core.data import BatchSampler
from pd_core.schedule import CosineSchedule
from pd_core.store import CheckpointStore
from pd_core.train import TrainState, copy_weights, new_teacher_state, resolve_runtime, train_teacher

OUT = Path(__file__).resolve().parent
DEFAULT_MILESTONES = (1000, 2000, 4000, 8000, 12000, 16000)


def snapshot_key(updates: int) -> str:
    return f"curve/teacher-u{updates:06d}"


def bias_corrected_ema(state: TrainState, init: list[torch.Tensor], *, decay: float) -> dict[str, torch.Tensor]:
    """ema_hat = (ema - d^n w_0) / (1 - d^n) for the parameters; buffers as they are."""
    sd = state.ema_state_dict()
    w = decay ** state.step
    for (name, _), w0 in zip(state.model.named_parameters(), init, strict=True):
        sd[name] = (sd[name] - w * w0) / (1.0 - w)
    return sd


def _resume(store: CheckpointStore, key: str, state: TrainState, *, want: lineage.Lineage) -> None:
    """Continue the curve's run: from a state of ``want``'s lineage, or from one that records no lineage (a run
    started before states carried it; the curve's store holds this one run); a state of another lineage is
    discarded by :func:`pd_core.jobs._resume`."""
    meta = store.read_state_meta(jobs.state_key(key))
    if meta is not None and "lineage" not in meta:
        saved = store.load_state(jobs.state_key(key))
        if saved is not None:
            state.load_tensors(*saved)
            print(f"resuming {store.uri(key)} from update {state.step} (a state without lineage)", flush=True)
            return
    jobs._resume(store, key, state, want=want, label="teacher", is_main=True)  # noqa: SLF001


def train(cfg: Config, store: CheckpointStore, milestones: list[int]) -> None:
    """Train to max(milestones), saving a bias-corrected EMA checkpoint at each milestone."""
    data = jobs.load_train_data(cfg)
    runtime = resolve_runtime(cfg.runtime)
    spec = jobs._model_spec(cfg, data)  # noqa: SLF001 - the pipeline's own architecture builder
    state = new_teacher_state(spec=spec, teacher_cfg=cfg.teacher, runtime=runtime, seed=cfg.pipeline.seed)
    init = [p.detach().clone() for p in state.model.parameters()]
    key = "curve/teacher"
    want = lineage.teacher_lineage(cfg)
    _resume(store, key, state, want=want)
    started = time.perf_counter()
    base_seconds = float(json.loads(store.get_bytes("curve/seconds.json"))["seconds"]) \
        if store.exists("curve/seconds.json") else 0.0
    save_state = jobs._state_saver(store, key, want)  # noqa: SLF001

    def snapshot(st: TrainState) -> None:
        seconds = base_seconds + time.perf_counter() - started
        if st.step in milestones and not store.is_complete(snapshot_key(st.step)):
            weights = copy_weights(bias_corrected_ema(st, init, decay=cfg.teacher.ema_decay))
            store.save_checkpoint(snapshot_key(st.step), tensors=weights, manifest=jobs._manifest(  # noqa: SLF001
                cfg, kind="teacher", spec=spec, steps=cfg.distill.start_steps, round_index=0, lineage_=want,
                schedule=CosineSchedule(logsnr_min=cfg.diffusion.logsnr_min, logsnr_max=cfg.diffusion.logsnr_max),
                extra={"updates": st.step, "train_seconds": round(seconds, 1)}))
            print(f"snapshot at {st.step} updates ({seconds:.0f} s of training)", flush=True)
        save_state(st)
        store.put_bytes("curve/seconds.json", json.dumps({"seconds": seconds}).encode())

    batches = BatchSampler(data, batch_size=cfg.teacher.batch_size, seed=cfg.pipeline.seed,
                           random_flip=cfg.data.random_flip)
    if not store.is_complete(snapshot_key(max(milestones))):
        train_teacher(state=state, teacher_cfg=cfg.teacher, diffusion_cfg=cfg.diffusion, runtime=runtime,
                      sample_batch=batches.batch, on_checkpoint=snapshot)
        snapshot(state)


def evaluate(cfg: Config, store: CheckpointStore, milestones: list[int]) -> pd.DataFrame:
    """One row per (milestone, metric): DDIM at distill.start_steps, the pipeline's evaluation settings."""
    device = resolve_runtime(cfg.runtime).device
    ctx = evaluation.feature_context(cfg, store, device=device)
    floor = evaluation.floor_record(cfg, store, ctx)
    rows = []
    for n in milestones:
        key = snapshot_key(n)
        rec = evaluation.evaluate_checkpoint(cfg, store, ctx, key=key, label="teacher_ddim", sampler="ddim",
                                             steps=cfg.distill.start_steps, device=device)
        seconds = store.read_manifest(key).get("train_seconds")
        for metric in (ctx.extractor.fd_name, ctx.extractor.kid_name):
            rows.append({"updates": n, "sampler": "teacher_ddim", "steps": cfg.distill.start_steps, "metric": metric,
                         "value": rec[metric], "n_samples": rec["n_samples"], "train_seconds": seconds})
    for metric in (ctx.extractor.fd_name, ctx.extractor.kid_name):
        rows.append({"updates": None, "sampler": "real_data_floor", "steps": None, "metric": metric,
                     "value": floor[metric], "n_samples": floor["n_samples"], "train_seconds": None})
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, path: Path, *, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fd = next(m for m in df["metric"].unique() if m.startswith("fd"))
    curve = df[(df["metric"] == fd) & (df["sampler"] == "teacher_ddim")].sort_values("updates")
    floor = df[(df["metric"] == fd) & (df["sampler"] == "real_data_floor")]["value"]
    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=120)
    ax.plot(curve["updates"], curve["value"], marker="o", label="teacher, DDIM")
    if len(floor):
        ax.axhline(float(floor.iloc[0]), color="grey", linestyle=":", label="real vs real (floor)")
        ax.axhline(4 * float(floor.iloc[0]), color="grey", linestyle="--", alpha=0.5, label="4x floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("teacher updates")
    ax.set_ylabel(f"{fd} (FD, classifier features)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="fmnist-cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--milestones", default=",".join(map(str, DEFAULT_MILESTONES)))
    p.add_argument("--work", default=".pd/teacher-curve", help="store for snapshots, state and evaluation caches")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    milestones = sorted({int(m) for m in args.milestones.split(",")})
    cfg = load_config(preset=args.preset, overrides=[f"teacher.updates={max(milestones)}", *args.overrides])
    store = CheckpointStore(str(Path(args.work).resolve()))
    if not args.report_only:
        train(cfg, store, milestones)
    df = evaluate(cfg, store, milestones)
    out = Path(args.out)
    df.to_csv(out / "teacher_curve.csv", index=False)
    plot(df, out / "teacher_curve.png",
         title=f"{args.preset} teacher, DDIM {cfg.distill.start_steps} steps, N={cfg.eval.num_samples} "
               f"({platform.machine()}, {torch.get_num_threads()} thread(s))")
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
