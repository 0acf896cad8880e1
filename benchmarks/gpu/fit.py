"""Fit the pipeline's update counts to a time budget from measured rates.

Predicted wall time of the quality part, with U_t teacher updates, U_r(n) updates of the round to
n steps, F evaluation network calls (images x steps) and measured seconds per update t_t, t_d and
network calls per second r:

    T = U_t t_t + sum_n U_r(n) t_d + E + overhead,    E = c F / r + R (t_s + t_0) + R' (t_s' + t_0),

where c = 1.25 covers the sampler's arithmetic and the uint8 images besides the network, R and R'
are the evaluation records at the pipeline's N and at the larger N (floors included), t_s and t_s'
the measured seconds of their statistics (FD, KID, precision/recall against the reference split's
features, on the CPU) and t_0 = 0.5 s a record's fixed cost (loading the checkpoint, features,
the cached JSON; an estimate). The fit scales the teacher's and the rounds' updates by one factor

    s = (budget - E - overhead) / (U_t t_t + sum_n U_r(n) t_d),

kept at 1 when |s - 1| <= tolerance (the preset runs as written) and clamped to [min_scale,
max_scale]; evaluation is not scaled (N is part of what is compared).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from benchmarks.gpu.quality import GRID_STEPS, end_points
from benchmarks.speed.gpu_bench import bench_sampling, bench_updates
from benchmarks.speed.models import CHANNELS
from pd_core.config import Config
from pd_core.data import load_split
from pd_core.evaluation import teacher_step_counts
from pd_core.metrics import FeatureStats, frechet_distance_stats, kernel_inception_distance, precision_recall
from pd_core.train import resolve_runtime
from pd_core.unet import unet_spec

EVAL_FACTOR = 1.25  # evaluation wall time per network call, over the network's own time
RECORD_S = 0.5  # a record's fixed cost besides sampling and statistics (estimate)
FEATURE_DIM = 128  # the feature classifier's feature width (pd_core.metrics.classifier's default)


@dataclass(frozen=True)
class Costs:
    """Measured rates of the pipeline's network on the run's device."""

    teacher_update_s: float  # one teacher update at teacher.batch_size
    distill_update_s: float  # one distillation update at distill.batch_size
    forwards_per_s: float  # network calls (images) per second at the evaluation batch, as evaluation samples
    stats_s: float  # FD + KID + precision/recall of one record at the pipeline's N
    stats_large_s: float  # the same at the larger N


@dataclass(frozen=True)
class Fit:
    """The update counts to run and the time they predict."""

    scale: float
    teacher_updates: int
    updates_per_round: int
    last_rounds_updates: int | None
    predicted_s: dict[str, float]  # at the fitted counts: teacher, rounds, evaluation, overhead, total
    preset_predicted_s: float  # total at the config's own counts

    def overrides(self) -> list[str]:
        """``key=value`` overrides that give a config these counts."""
        out = [f"teacher.updates={self.teacher_updates}", f"distill.updates_per_round={self.updates_per_round}"]
        if self.last_rounds_updates is not None:
            out.append(f"distill.last_rounds_updates={self.last_rounds_updates}")
        return out


def evaluation_forwards(cfg: Config, *, large_n: int) -> int:
    """Network calls (images x steps) of the quality part's evaluation: the teacher's DDIM and every gamma at each
    N of the chain, each student's DDIM, the sample grids, and the end points at ``large_n``."""
    n, ev = cfg.eval.num_samples, cfg.eval
    students = [s for _, s in cfg.distill.rounds()]
    teacher = n * sum(teacher_step_counts(cfg)) * (1 + len(ev.stochastic_gammas))
    grids = ev.grid_size ** 2 * (cfg.distill.start_steps + sum(students) + sum(GRID_STEPS))
    large = large_n * sum(steps for _, steps in end_points(cfg))
    return teacher + n * sum(students) + grids + large


def evaluation_records(cfg: Config) -> tuple[int, int]:
    """(records at the pipeline's N, records at the larger N), the real-vs-real floors included."""
    teacher = len(teacher_step_counts(cfg)) * (1 + len(cfg.eval.stochastic_gammas))
    return 1 + teacher + len(cfg.distill.rounds()), 1 + len(end_points(cfg))


def round_updates(cfg: Config) -> int:
    """Distillation updates of every round together."""
    return sum(cfg.distill.updates_for(s) for _, s in cfg.distill.rounds())


def predict(cfg: Config, costs: Costs, *, large_n: int, overhead_s: float) -> dict[str, float]:
    """Predicted seconds of each phase of the quality part (teacher, rounds, evaluation, overhead, total)."""
    records, large_records = evaluation_records(cfg)
    parts = {"teacher": cfg.teacher.updates * costs.teacher_update_s,
             "rounds": round_updates(cfg) * costs.distill_update_s,
             "evaluation": EVAL_FACTOR * evaluation_forwards(cfg, large_n=large_n) / costs.forwards_per_s
             + records * (costs.stats_s + RECORD_S) + large_records * (costs.stats_large_s + RECORD_S),
             "overhead": overhead_s}
    return {**{k: round(v, 1) for k, v in parts.items()}, "total": round(sum(parts.values()), 1)}


def _round_to(x: float, *, unit: int) -> int:
    """x to the nearest multiple of ``unit`` (halves up), at least ``unit``."""
    return max(unit, math.floor(x / unit + 0.5) * unit)


def fit_schedule(cfg: Config, costs: Costs, *, budget_s: float, large_n: int, overhead_s: float,
                 tolerance: float = 0.1, min_scale: float = 0.25, max_scale: float = 2.0) -> Fit:
    """One factor for the teacher's and the rounds' updates so the predicted time meets ``budget_s`` (module doc)."""
    base = predict(cfg, costs, large_n=large_n, overhead_s=overhead_s)
    train = base["teacher"] + base["rounds"]
    scale = (budget_s - base["evaluation"] - overhead_s) / train if train > 0 else 1.0
    scale = 1.0 if abs(scale - 1.0) <= tolerance else min(max(scale, min_scale), max_scale)
    d = cfg.distill
    if scale == 1.0:
        counts = (cfg.teacher.updates, d.updates_per_round, d.last_rounds_updates)
    else:
        counts = (_round_to(scale * cfg.teacher.updates, unit=100 if cfg.teacher.updates >= 1000 else 10),
                  _round_to(scale * d.updates_per_round, unit=10),
                  None if d.last_rounds_updates is None else _round_to(scale * d.last_rounds_updates, unit=10))
    fitted = cfg.model_copy(update={
        "teacher": cfg.teacher.model_copy(update={"updates": counts[0]}),
        "distill": d.model_copy(update={"updates_per_round": counts[1], "last_rounds_updates": counts[2]})})
    return Fit(scale=round(scale, 3), teacher_updates=counts[0], updates_per_round=counts[1],
               last_rounds_updates=counts[2], predicted_s=predict(fitted, costs, large_n=large_n,
                                                                  overhead_s=overhead_s),
               preset_predicted_s=base["total"])


def stats_seconds(*, n: int, reference: int, kid_subsets: int, kid_subset_size: int, seed: int = 0) -> float:
    """Seconds of one record's statistics (FD, KID, precision/recall) on random features of the run's shapes:
    ``n`` samples against ``reference`` reference images, FEATURE_DIM features each."""
    rng = np.random.default_rng(seed)
    fake, real = rng.standard_normal((n, FEATURE_DIM)), rng.standard_normal((reference, FEATURE_DIM))
    t0 = time.perf_counter()
    frechet_distance_stats(FeatureStats.from_features(fake), FeatureStats.from_features(real))
    kernel_inception_distance(fake, real, subsets=kid_subsets, subset_size=min(kid_subset_size, n), seed=seed)
    precision_recall(real, fake)
    return time.perf_counter() - t0


def measure_costs(cfg: Config, large_cfg: Config, *, steps: int, blocks: int, warmup: int, iters: int) -> Costs:
    """Seconds per teacher and distillation update (the production update step, the config's runtime, network and
    batches), network calls per second at the evaluation batch (fp32 weights, inference mode, as evaluation), and
    the seconds of a record's statistics at the pipeline's N and at ``large_cfg``'s."""
    runtime = resolve_runtime(cfg.runtime)
    spec = unet_spec(cfg, in_channels=CHANNELS.get(cfg.data.name, 3))
    student = dataclasses.replace(spec, dropout=cfg.distill.dropout)
    teacher = bench_updates(spec, runtime=runtime, batch=cfg.teacher.batch_size, steps=steps, blocks=blocks,
                            warmup=warmup, kinds=("teacher",), diffusion=cfg.diffusion)
    distill = bench_updates(student, runtime=runtime, batch=cfg.distill.batch_size, steps=steps, blocks=blocks,
                            warmup=warmup, kinds=("distill",), diffusion=cfg.diffusion)
    batch = min(large_cfg.eval.batch_size, large_cfg.eval.num_samples)
    forwards = bench_sampling(spec, device=str(runtime.device), batch=batch, step_counts=(1,), compiled=False,
                              iters=iters, autocast=False)[1]
    reference = len(load_split(cfg.data, split="test"))
    stats = [stats_seconds(n=c.eval.num_samples, reference=reference, kid_subsets=c.eval.kid_subsets,
                           kid_subset_size=c.eval.kid_subset_size) for c in (cfg, large_cfg)]
    return Costs(teacher_update_s=teacher["teacher_s"], distill_update_s=distill["distill_s"],
                 forwards_per_s=forwards, stats_s=stats[0], stats_large_s=stats[1])
