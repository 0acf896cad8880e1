"""Orchestration overhead of the smoke pipeline with embedded defaults, per round.

    python -m benchmarks.speed.orchestration                          # what `pd run` does
    python -m benchmarks.speed.orchestration --prefect-starts-server  # baseline: Prefect starts its server

Does what ``pd run --preset smoke`` does in this process: validates the config, starts Prefect's
temporary API server and warms up while it starts (flows.cli.start_prefect_and_warm_up), then calls
``flows.pipeline.distillation_pipeline`` (MLflow on sqlite, checkpoint store in a local folder, all
under a fresh temporary PD_HOME), then calls it again (every round complete: all skipped). Wrappers
around the library functions attribute each second of the flow's wall time to exactly one bucket
(exclusive time: a store write inside training counts as storage, not training):

- compute: training loops (pd_core.train via jobs), evaluation (classifier, reference and sample
  features, FD/KID), sampling (every sampler call);
- overhead: data loading, checkpoint store, MLflow tracking, progress reporting (Prefect artifacts +
  MLflow metrics inside the loop), model construction, our own task and flow code outside those,
  Prefect's task engine (Task.__call__ outside the task body: task-run creation, state
  transitions through the API), Prefect events, and "prefect flow engine" = everything outside the
  flow body (flow-run creation, the temporary server's start when Prefect starts it, finalisation,
  log shipping).

orchestration_overhead_s_per_round = (flow wall - compute) / rounds, the issue's definition. What
happens before the flow call (config, imports, the server's start, warm-up) is reported as
orchestration_pre_flow_s, and orchestration_process_overhead_s_per_round counts everything from
process start to the pipeline's end (minus compute), so moving work out of the flow cannot hide it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from tasks.prefect_server import EARLY_START_ENV

COMPUTE = ("training", "evaluation", "sampling")


class Ledger:
    """Exclusive wall time per bucket: entering a wrapped call pauses the enclosing one (per thread)."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.first: dict[str, float] = {}
        self.longest: dict[str, float] = defaultdict(float)  # the longest single call (inclusive) per bucket
        self.by_label: dict[str, list[float]] = defaultdict(list)  # exclusive seconds of each labelled call
        self.marks: list[tuple[float, str, float]] = []  # (start, label, compute seconds so far) of labelled calls
        self._local = threading.local()
        self._lock = threading.Lock()

    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def wrap(self, bucket: str, fn, *, label=None):
        """``fn`` timed into ``bucket``; ``label(*args)`` names the call in ``by_label`` (exclusive seconds)."""
        ledger = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            stack, now = ledger._stack(), ledger.clock()
            with ledger._lock:
                ledger.first.setdefault(bucket, now)
                ledger.calls[bucket] += 1
                if stack:  # pause the enclosing bucket
                    outer = stack[-1]
                    ledger.seconds[outer[0]] += now - outer[1]
                    outer[2] += now - outer[1]
                if label is not None:  # a mark: when this call started and how much compute had been done
                    ledger.marks.append((now, label(*args), sum(ledger.seconds.get(b, 0.0) for b in COMPUTE)))
            stack.append([bucket, now, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                end = ledger.clock()
                name, since, exclusive = stack.pop()
                with ledger._lock:
                    ledger.seconds[name] += end - since
                    ledger.longest[name] = max(ledger.longest[name], end - now)
                    if label is not None:
                        ledger.by_label[f"{bucket}: {label(*args)}"].append(exclusive + end - since)
                    if stack:
                        stack[-1][1] = end  # resume the enclosing bucket
        return wrapper

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.first.clear()
        self.longest.clear()
        self.by_label.clear()
        self.marks.clear()


def instrument(ledger: Ledger) -> None:
    """Wrap the functions the tasks call (module attributes are looked up at call time)."""
    from pd_core import evaluation, jobs, store
    from tasks import progress, tracking

    for name in ("train_teacher", "distill_round"):
        setattr(jobs, name, ledger.wrap("training", getattr(jobs, name)))
    jobs.load_train_data = ledger.wrap("data loading", jobs.load_train_data)
    for name in ("new_teacher_state", "new_student_state", "frozen_teacher"):
        setattr(jobs, name, ledger.wrap("model construction", getattr(jobs, name)))
    for name in ("evaluate_sampler", "load_or_train_classifier", "load_or_compute_reference", "extract_features",
                 "real_floor", "load_split"):
        setattr(evaluation, name, ledger.wrap("evaluation", getattr(evaluation, name)))
    make = evaluation.make_sample_fn

    def make_sample_fn(*args, **kwargs):
        return ledger.wrap("sampling", make(*args, **kwargs))
    evaluation.make_sample_fn = make_sample_fn
    for name in ("save_checkpoint", "load_checkpoint", "read_manifest", "is_complete", "save_state", "load_state",
                 "clear_state", "put_bytes", "get_bytes", "exists", "list", "acquire_lease", "delete_checkpoint"):
        setattr(store.CheckpointStore, name, ledger.wrap("checkpoint store", getattr(store.CheckpointStore, name)))
    for name in ("start_run", "find_run", "log_params", "log_metrics", "set_tags", "log_artifact", "log_table",
                 "log_text", "end_run", "flush", "log_sampler_model", "set_alias", "run_link"):
        if hasattr(tracking.Tracker, name):
            setattr(tracking.Tracker, name, ledger.wrap("mlflow", getattr(tracking.Tracker, name),
                                                        label=lambda *_a, _n=name: _n))
    progress.ProgressReporter.__call__ = ledger.wrap("progress reporting", progress.ProgressReporter.__call__)
    # Prefect's engine calls task.fn / flow.fn: time inside them that no finer bucket claims is our own task and
    # flow code; what is left outside is Prefect's engine (task runs, states, the API server, logs, events)
    import prefect.tasks

    from flows import pipeline
    from tasks import evaluate, report, training

    call = prefect.tasks.Task.__call__
    prefect.tasks.Task.__call__ = ledger.wrap("prefect task engine", call, label=lambda task, *_a: task.name)
    pipeline.emit_event = ledger.wrap("prefect events", pipeline.emit_event)
    for task in (training.ensure_teacher_task, training.distill_round_task, evaluate.evaluate_teacher_task,
                 evaluate.evaluate_round_task, report.publish_report_task):
        task.fn = ledger.wrap("task code (ours)", task.fn)
    pipeline.distillation_pipeline.fn = ledger.wrap("flow code (ours)", pipeline.distillation_pipeline.fn)


def run_once(ledger: Ledger, server, *, name: str, overrides: list[str], task_tags: list[str] | None) -> dict:
    from flows.pipeline import distillation_pipeline

    ledger.reset()
    t0 = time.perf_counter()
    with server.flow_settings() if server else contextlib.nullcontext():  # as `pd run`
        result = distillation_pipeline(preset="smoke", name=name, overrides=overrides, task_tags=task_tags)
    wall = time.perf_counter() - t0
    buckets = dict(ledger.seconds)
    compute = sum(buckets.get(b, 0.0) for b in COMPUTE)
    named = sum(buckets.values())
    startup = ledger.first.get("flow code (ours)", t0) - t0  # flow run creation (+ ephemeral API server start)
    # per round: from its distill-round task call to the next round's (or the report's), minus the compute in it
    task_marks = [(t, name, c) for t, name, c in ledger.marks if name in ("distill-round", "publish-report")]
    per_round = [(t1 - t0) - (c1 - c0) for (t0, n0, c0), (t1, _, c1) in zip(task_marks, task_marks[1:], strict=False)
                 if n0 == "distill-round"]
    return {"per_round": per_round, "wall": wall, "compute": compute, "overhead": wall - compute, "buckets": buckets,
            "glue": wall - named, "startup": startup, "rounds": len(result.rounds),
            "calls": dict(ledger.calls), "longest": dict(ledger.longest),
            "by_label": {k: list(v) for k, v in ledger.by_label.items()}}


def report(label: str, r: dict) -> None:
    print(f"\n{label}: flow wall {r['wall']:.2f} s, compute {r['compute']:.2f} s, overhead {r['overhead']:.2f} s "
          f"over {r['rounds']} rounds = {r['overhead'] / r['rounds']:.2f} s/round "
          f"(startup until the flow body runs {r['startup']:.2f} s)")
    print("  overhead inside each round (its training task start -> the next one's, minus compute): "
          + ", ".join(f"{s:.2f} s" for s in r["per_round"]))
    rows = sorted(r["buckets"].items(), key=lambda kv: -kv[1]) + [("prefect flow engine (unattributed)", r["glue"])]
    for bucket, secs in rows:
        kind = "compute " if bucket in COMPUTE else "overhead"
        calls = r["calls"].get(bucket)
        longest = f", longest call {r['longest'][bucket]:.2f} s" if calls else ""
        print(f"  {kind} {bucket:32s} {secs:7.2f} s{f'  ({calls} calls{longest})' if calls else ''}")
    for name, secs in sorted(r["by_label"].items()):
        print(f"      {name:44s} {len(secs):3d} calls: " + " ".join(f"{t:.2f}" for t in secs[:12]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="keep the temporary PD_HOME")
    p.add_argument("--home", type=Path, default=None,
                   help="use (and keep) this PD_HOME; if an earlier run left Prefect's and MLflow's databases there, "
                        "this measures a warm project (rows get the suffix _warm_home)")
    p.add_argument("--gpu-tag", action="store_true",
                   help="diagnosis: tag the GPU tasks `gpu` as on a standing server (Prefect then acquires a "
                        "tag-concurrency slot per task run); rows get the suffix _gpu_tag")
    p.add_argument("--prefect-starts-server", action="store_true",
                   help="baseline: PD_PREFECT_EARLY_START=0, Prefect starts its temporary server at the flow's "
                        "first client instead of `pd run` starting it first; rows get the suffix "
                        "_prefect_starts_server")
    p.add_argument("--threads", type=int, default=1, help="runtime.threads of the pipeline (1: steady on a shared box)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    home = args.home.resolve() if args.home else Path(tempfile.mkdtemp(prefix="pd-orch-bench-"))
    warm = args.home is not None and (home / "mlflow.db").exists()
    if args.home:
        home.mkdir(parents=True, exist_ok=True)
        args.keep = True
    os.environ["PD_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)  # embedded defaults: a temporary Prefect server
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("PD_STORAGE", None)
    if args.prefect_starts_server:
        os.environ[EARLY_START_ENV] = "0"
    t0 = time.perf_counter()  # as at the start of `pd run`: nothing heavy imported yet (torch neither)
    # exactly what `pd run` does before its flow call: validate, start the server, import, warm up
    from flows.cli import start_prefect_and_warm_up
    from tasks.common import resolve_config
    from tasks.env import prepare_environment

    prepare_environment()
    name = f"orch-bench-{uuid.uuid4().hex[:8]}"  # a new pipeline every time: the first run trains
    overrides = [f"runtime.threads={args.threads}"]
    server = start_prefect_and_warm_up(resolve_config(preset="smoke", name=name, overrides=overrides))
    pre_flow = time.perf_counter() - t0
    from benchmarks.speed.common import machine, row, write_rows

    print(machine())
    print(f"process start -> flow call (config, imports, server start, warm-up): {pre_flow:.2f} s")
    ledger = Ledger()
    instrument(ledger)
    task_tags = ["gpu"] if args.gpu_tag else None  # None: the flow's default, untagged on the embedded server
    try:
        first = run_once(ledger, server, name=name, overrides=overrides, task_tags=task_tags)
        report("first run (teacher + 3 rounds trained and evaluated)", first)
        second = run_once(ledger, server, name=name, overrides=overrides, task_tags=task_tags)
        report("rerun (every checkpoint and evaluation complete: all skipped)", second)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    n = first["rounds"]
    rows = [
        row("orchestration_overhead_s_per_round", first["overhead"] / n, "s/round"),
        row("orchestration_overhead_s_per_round_excl_startup", (first["overhead"] - first["startup"]) / n, "s/round"),
        row("orchestration_overhead_s_in_round_median", sorted(first["per_round"])[len(first["per_round"]) // 2],
            "s/round (train + eval tasks of one round, compute excluded)"),
        row("orchestration_startup_s", first["startup"], "s"),
        row("orchestration_pre_flow_s", pre_flow, "s (process start -> flow call: config, imports, server, warm-up)"),
        row("orchestration_process_overhead_s_per_round", (pre_flow + first["overhead"]) / n,
            "s/round (process start -> pipeline end, minus compute)"),
        row("orchestration_flow_wall_s", first["wall"], "s"),
        row("orchestration_rerun_all_skipped_s", second["wall"], "s"),
    ]
    for bucket, secs in first["buckets"].items():
        if bucket not in COMPUTE:
            row_name = "orchestration_" + re.sub(r"[^a-z0-9]+", "_", bucket).strip("_") + "_s_per_round"
            rows.append(row(row_name, secs / n, "s/round"))
    rows.append(row("orchestration_prefect_flow_engine_s_per_round", first["glue"] / n, "s/round"))
    if args.gpu_tag:
        rows = [{**r, "benchmark": r["benchmark"] + "_gpu_tag"} for r in rows]
    if args.prefect_starts_server:
        rows = [{**r, "benchmark": r["benchmark"] + "_prefect_starts_server"} for r in rows]
    if warm:
        rows = [{**r, "benchmark": r["benchmark"] + "_warm_home"} for r in rows]
    if not args.no_write:
        write_rows(rows)


if __name__ == "__main__":
    main()
