"""Data-parallel jobs from the caller's side: run a teacher or a round in ``nproc`` processes on ``nodes`` nodes.

    launch_job(cfg, job="round", ...)                       the caller's process (e.g. a Prefect task)
      one node:  python -m torch.distributed.run --standalone --nproc-per-node P -m pd_core.distributed_job ...
      N nodes:   one torchrun agent per node, joined by a c10d rendezvous (an id per attempt):
                 python -m torch.distributed.run --nnodes N --nproc-per-node P --rdzv-backend c10d
                     --rdzv-endpoint HOST:PORT --rdzv-id ID --max-restarts R -m pd_core.distributed_job ...
         rank r of W = N P: dist.init() -> jobs.run_round(cfg, store, ...) -> dist.teardown()

``distill.batch_size`` / ``teacher.batch_size`` times ``nproc`` is the global batch whatever the node
count: each of the N P processes takes batch_size / N examples (see
``pd_core.train.batches.rank_batches``). Only global rank 0 logs progress and writes the in-round
state and the checkpoints. A worker that dies makes torchrun restart the whole job (up to
``runtime.max_restarts`` times, on several nodes); the restarted ranks resume from the last in-round
state. The local launcher runs the N agents on this machine (127.0.0.1: tests and benchmarks);
``tasks.kubernetes`` runs them as pods. The torchrun child reports progress to the launcher as
``PD_PROGRESS {json}`` lines on stdout and its result (or error) as a JSON file. Nothing here imports
Prefect or MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from pd_core.config import Config, ConfigError
from pd_core.dist import DistributedJobError
from pd_core.finite import NonFiniteOutputError
from pd_core.jobs import CheckpointInfo, PipelineMismatchError
from pd_core.malloc_env import with_malloc_tunables
from pd_core.net import free_port
from pd_core.store import StorageIOError, StoreError, TransientStorageIOError
from pd_core.train import NonFiniteLossError, ProgressEvent

log = logging.getLogger("pd_core.launch")

PROGRESS_PREFIX = "PD_PROGRESS "  # a torchrun child's progress line: PD_PROGRESS {ProgressEvent as JSON}
# The environment of every agent of a multi-node job. torchrun's c10d rendezvous otherwise shares one
# TCPStore, hosted by an agent, across restarts; after a SIGKILL restart both new workers were once seen
# waiting forever in the gloo process group's setup on it. With sharing off, global rank 0's worker
# hosts a new store for every rendezvous round.
RESTART_SAFE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


# A child's error is re-raised as the same type where it is one of these (task retry conditions depend on it).
_ERROR_TYPES: dict[str, type[BaseException]] = {
    cls.__name__: cls for cls in (NonFiniteLossError, NonFiniteOutputError, PipelineMismatchError, StoreError,
                                  StorageIOError, TransientStorageIOError, ConfigError, ValueError, TimeoutError,
                                  ConnectionError)}


def rebuild_error(type_name: str, message: str) -> BaseException:
    """The child's error as the same type where it is one of ours, else DistributedJobError."""
    cls = _ERROR_TYPES.get(type_name)
    try:
        return cls(message) if cls is not None else DistributedJobError(f"{type_name}: {message}")
    except TypeError:
        return DistributedJobError(f"{type_name}: {message}")


_rebuild_error = rebuild_error  # the name tests/test_ddp.py knows


def torchrun_command(*, nproc: int, module: str, args: list[str], nodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str | None = None, max_restarts: int = 0, rdzv_timeout_s: int = 900,
                     local_addr: str | None = None, python: str = sys.executable) -> list[str]:
    """The torchrun command of one node: ``--standalone`` on one node; with ``nodes`` > 1 a c10d rendezvous at
    ``rdzv_endpoint`` (host:port) under ``rdzv_id`` that restarts the job up to ``max_restarts`` times."""
    head = [python, "-m", "torch.distributed.run"]
    if nodes <= 1:
        return [*head, "--standalone", f"--nproc-per-node={nproc}", "-m", module, *args]
    if not rdzv_endpoint or not rdzv_id:
        raise ValueError("a job on several nodes needs rdzv_endpoint (host:port) and rdzv_id")
    multi = [f"--nnodes={nodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
             f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}", f"--rdzv-conf=join_timeout={rdzv_timeout_s}",
             f"--max-restarts={max_restarts}", *([f"--local-addr={local_addr}"] if local_addr else [])]
    return [*head, *multi, "-m", module, *args]


def job_args(*, config: str, job: str, out: str, teacher: str | None = None, round_index: int | None = None,
             fault_at_step: int | None = None) -> list[str]:
    """The arguments of ``pd_core.distributed_job`` (paths or URLs of the config, teacher and result JSON)."""
    args = ["--config", config, "--job", job, "--out", out]
    if teacher is not None:
        args += ["--teacher", teacher]
    if round_index is not None:
        args += ["--round-index", str(round_index)]
    if fault_at_step is not None:
        args += ["--fault-at-step", str(fault_at_step)]
    return args


def rdzv_id_for(cfg: Config, *, job: str, round_index: int | None = None) -> str:
    """A rendezvous id of its own for each attempt: ``<pipeline>-<job>[<round>]-<8 hex>``."""
    label = f"{job}{round_index}" if round_index is not None else job
    return f"{cfg.pipeline.name}-{label}-{uuid.uuid4().hex[:8]}".lower().replace("_", "-").replace(".", "-")


def is_data_parallel(cfg: Config) -> bool:
    """True when a training job runs under torchrun: several processes on a node, or several nodes."""
    return cfg.runtime.nproc > 1 or cfg.runtime.nodes > 1


def child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment torchrun and its ranks start with: ``environ``, plus this checkout on PYTHONPATH (works
    without an install), unbuffered output, and the glibc malloc settings of :mod:`pd_core.malloc_env`."""
    env = with_malloc_tunables(environ)
    root = str(Path(__file__).resolve().parents[1])  # the folder holding pd_core
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def launch_job(cfg: Config, *, job: str, nproc: int | None = None, round_index: int | None = None,
               teacher: CheckpointInfo | None = None, on_progress: Callable[[ProgressEvent], None] | None = None,
               fault_at_step: int | None = None, log_line: Callable[[str], None] | None = None) -> CheckpointInfo:
    """Run ``jobs.ensure_teacher`` (job="teacher"), ``jobs.run_guide_distill`` (job="guide", ``teacher`` the
    teacher's info) or ``jobs.run_round`` (job="round") in ``nproc`` processes on each of ``runtime.nodes``
    nodes (all on this machine: one torchrun agent per node, c10d rendezvous on 127.0.0.1 or
    ``runtime.rdzv_endpoint``).

    Blocks until every agent exits; relays the children's log lines to ``log_line`` (default: this
    module's logger) and their progress events to ``on_progress``; returns the job's
    :class:`~pd_core.jobs.CheckpointInfo`, or raises the child's error (same type for our own errors).
    torchrun runs in its own process group: if the caller is interrupted (e.g. the Prefect task is
    cancelled), torchrun gets SIGTERM and stops its ranks; SIGKILL follows after a grace period.
    """
    if job not in ("teacher", "guide", "round"):
        raise ValueError(f"job must be 'teacher', 'guide' or 'round'; got {job!r}")
    if job == "round" and (round_index is None or teacher is None):
        raise ValueError("job='round' needs round_index and teacher (the teacher's CheckpointInfo)")
    if job == "guide" and teacher is None:
        raise ValueError("job='guide' needs teacher (the teacher's CheckpointInfo)")
    nproc = int(nproc if nproc is not None else cfg.runtime.nproc)
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1; got {nproc}")
    if cfg.runtime.device != "cpu" and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"runtime.nproc={nproc} but this machine has {torch.cuda.device_count()} CUDA devices; "
                         f"lower runtime.nproc")
    log_line = log_line or (lambda line: log.info("%s", line))
    runtime = cfg.runtime
    with tempfile.TemporaryDirectory(prefix="pd-ddp-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
        os.chmod(tmpdir / "config.json", 0o600)
        teacher_path = None
        if job in ("guide", "round"):
            (tmpdir / "teacher.json").write_text(json.dumps(dataclasses.asdict(teacher)))
            teacher_path = str(tmpdir / "teacher.json")
        args = job_args(config=str(tmpdir / "config.json"), job=job, out=str(tmpdir / "result.json"),
                        teacher=teacher_path, round_index=round_index if job == "round" else None,
                        fault_at_step=fault_at_step)
        if runtime.nodes <= 1:
            cmds = [torchrun_command(nproc=nproc, module="pd_core.distributed_job", args=args)]
        else:  # one agent per node, all on this machine
            endpoint = runtime.rdzv_endpoint or f"127.0.0.1:{free_port()}"
            rdzv_id = rdzv_id_for(cfg, job=job, round_index=round_index)
            cmds = [torchrun_command(nproc=nproc, module="pd_core.distributed_job", args=args, nodes=runtime.nodes,
                                     rdzv_endpoint=endpoint, rdzv_id=rdzv_id, max_restarts=runtime.max_restarts,
                                     rdzv_timeout_s=runtime.rdzv_timeout_s, local_addr="127.0.0.1")
                    for _ in range(runtime.nodes)]
        log.info("data-parallel %s on %d node(s) x %d processes: %s", job, len(cmds), nproc, " ".join(cmds[0][:6]))
        env = child_env(os.environ)
        if runtime.nodes > 1:
            env.update(RESTART_SAFE_ENV)
        rc, tail = _run_agents(cmds, env=env, on_progress=on_progress, log_line=log_line)
        result_path = tmpdir / "result.json"
        result = json.loads(result_path.read_text()) if result_path.exists() else None
    if result is not None and result.get("ok"):
        return CheckpointInfo(**result["info"])
    if result is not None:
        raise rebuild_error(result["error_type"], result["message"])
    raise DistributedJobError(f"torchrun exited with status {rc} and no result; last output:\n" + "\n".join(tail[-15:]))


def relay_line(line: str, *, on_progress: Callable[[ProgressEvent], None] | None,
               log_line: Callable[[str], None]) -> bool:
    """Hand a child's output line on: a progress line to ``on_progress``, any other to ``log_line``.
    True for a log line."""
    if line.startswith(PROGRESS_PREFIX):
        if on_progress is not None:
            on_progress(ProgressEvent(**json.loads(line[len(PROGRESS_PREFIX):])))
        return False
    log_line(line)
    return True


def _run_agents(cmds: list[list[str]], *, env: dict[str, str], on_progress: Callable[[ProgressEvent], None] | None,
                log_line: Callable[[str], None]) -> tuple[int, list[str]]:
    """Start one torchrun agent per command (each in its own process group), relay their lines from this
    thread, wait for all; the first non-zero exit status (0 if none) and the last 40 log lines."""
    lines: queue.Queue[str | None] = queue.Queue()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
                              start_new_session=True) for cmd in cmds]

    def pump(proc: subprocess.Popen, prefix: str) -> None:
        for raw in proc.stdout:  # stdout=PIPE: never None
            lines.put(raw.rstrip("\n") if raw.startswith(PROGRESS_PREFIX) else prefix + raw.rstrip("\n"))
        lines.put(None)

    readers = [threading.Thread(target=pump, args=(p, f"[node {i}] " if len(procs) > 1 else ""), daemon=True)
               for i, p in enumerate(procs)]
    tail: list[str] = []
    try:
        for reader in readers:
            reader.start()
        open_pipes = len(readers)
        while open_pipes:
            line = lines.get()
            if line is None:
                open_pipes -= 1
            elif relay_line(line, on_progress=on_progress, log_line=log_line):
                tail = (tail + [line])[-40:]
        codes = [p.wait() for p in procs]
    except BaseException:
        for proc in procs:
            _terminate_group(proc)
        raise
    return next((c for c in codes if c != 0), 0), tail


def _terminate_group(proc: subprocess.Popen, *, grace_s: float = 10.0) -> None:
    """SIGTERM torchrun's process group (torchrun forwards it to the ranks), SIGKILL what is left after grace_s."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def progress_line(event: ProgressEvent) -> str:
    """The line a torchrun child prints for one progress event (parsed back by :func:`launch_job`)."""
    return PROGRESS_PREFIX + json.dumps(dataclasses.asdict(event))


