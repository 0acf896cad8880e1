"""Data-parallel jobs: process-group setup, rank-aware storage, and the torchrun launcher.

A round (or the teacher) runs data-parallel by starting the same job in ``nproc`` processes with
``torchrun``; each process trains a DistributedDataParallel replica (NCCL on GPUs, gloo on CPUs):

    launch_job(cfg, job="round", ...)                       the caller's process (e.g. a Prefect task)
      -> python -m torch.distributed.run --standalone --nproc-per-node N -m pd_core.distributed_job ...
         rank r: init() -> jobs.run_round(cfg, RankZeroStore(store), ...) -> teardown()

What differs from one process (see ``pd_core.train``): ``distill.batch_size`` / ``teacher.batch_size``
are PER PROCESS, the effective batch is batch x nproc (logged); rank r trains on batch k N + r of
the single-process batch stream at update k, so the N ranks together see exactly the batches one
process with the N-times batch would; noise and dropout generators are seeded per rank
(:func:`rank_seed`); only rank 0 logs progress, writes in-round checkpoints and the final checkpoint
(:class:`RankZeroStore`). Evaluation is a separate single-process task.

Nothing here imports Prefect or MLflow; the torchrun child reports progress to the launcher as
``PD_PROGRESS {json}`` lines on stdout and its result (or error) as a JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pd_core.net import free_port  # noqa: F401  (part of this module's API: MASTER_PORT)

log = logging.getLogger(__name__)

PROGRESS_PREFIX = "PD_PROGRESS "  # a torchrun child's progress line: PD_PROGRESS {ProgressEvent as JSON}


class DistributedJobError(RuntimeError):
    """A data-parallel job failed in a way that has no more specific error type."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank r of world_size processes, local_rank r on this host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistInfo:
    """The process group's view of this process ((0, 1, 0) when there is no process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(*, backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain ``python`` run) there is nothing to join: returns (0, 1, 0).
    On CUDA each process takes GPU ``LOCAL_RANK``.
    """
    if dist.is_initialized():
        return current()
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return DistInfo()
    backend = backend or default_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise DistributedJobError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                                      f"visible; lower runtime.nproc")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return current()


def teardown() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s generators: ``seed`` itself on rank 0 (so one process is unchanged), derived elsewhere."""
    if rank == 0:
        return seed
    from pd_core.data import derive_seed

    return derive_seed(seed, "rank", rank)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over the processes (``value`` itself without a process group)."""
    info = current()
    if info.world_size == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


# ----------------------------------------------------------------------------------------------
# Storage seen from one rank


class RankZeroStore:
    """A CheckpointStore for a data-parallel job: rank 0 writes, the other ranks read.

    Reads pass through on every rank. In-round state, small files and deletions are written by
    rank 0 only (no-ops elsewhere; ``pd_core.train`` calls the checkpoint hook on rank 0 only).
    ``save_checkpoint`` is a collective: every rank calls it (jobs do, after training), rank 0
    writes, and every rank returns rank 0's :class:`~pd_core.store.CheckpointRef` (or raises its error).
    """

    _RANK0_ONLY = ("save_state", "clear_state", "put_bytes", "delete_checkpoint", "acquire_lease")

    def __init__(self, store: Any, info: DistInfo | None = None):
        self._store = store
        self._info = info or current()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name in self._RANK0_ONLY and not self._info.is_main:
            return lambda *args, **kwargs: None
        return attr

    def __repr__(self) -> str:
        return f"RankZeroStore({self._store!r}, rank={self._info.rank})"

    def save_checkpoint(self, key: str, **kwargs: Any) -> Any:
        if self._info.world_size == 1:
            return self._store.save_checkpoint(key, **kwargs)
        payload: list[Any] = [None]
        error: Exception | None = None
        if self._info.is_main:
            try:
                payload[0] = ("ok", self._store.save_checkpoint(key, **kwargs))
            except Exception as err:  # every rank must leave the collective, then raise
                error = err
                payload[0] = ("error", (type(err).__name__, str(err)))
        dist.broadcast_object_list(payload, src=0)
        status, value = payload[0]
        if status == "error":
            if error is not None:
                raise error
            raise _rebuild_error(value[0], f"rank 0 could not save {key}: {value[1]}")
        return value


# ----------------------------------------------------------------------------------------------
# The launcher (the caller's side)


def _error_types() -> dict[str, type[BaseException]]:
    from pd_core.config import ConfigError
    from pd_core.jobs import PipelineMismatchError
    from pd_core.store import StorageIOError, StoreError
    from pd_core.train import NonFiniteLossError

    return {cls.__name__: cls for cls in (NonFiniteLossError, PipelineMismatchError, StoreError, StorageIOError,
                                          ConfigError, ValueError, TimeoutError, ConnectionError)}


def _rebuild_error(type_name: str, message: str) -> BaseException:
    """The launcher re-raises a child's error as the same type where it is one of ours (retry logic depends on it)."""
    cls = _error_types().get(type_name)
    try:
        return cls(message) if cls is not None else DistributedJobError(f"{type_name}: {message}")
    except TypeError:
        return DistributedJobError(f"{type_name}: {message}")


def torchrun_command(*, nproc: int, module: str, args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE ARGS`` (this interpreter)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]


def launch_job(cfg: Any, *, job: str, nproc: int | None = None, round_index: int | None = None,
               teacher: Any = None, on_progress: Callable[[Any], None] | None = None,
               fault_at_step: int | None = None, log_line: Callable[[str], None] | None = None) -> Any:
    """Run ``jobs.ensure_teacher`` (job="teacher") or ``jobs.run_round`` (job="round") in ``nproc`` processes.

    Blocks until torchrun exits; relays the children's log lines to ``log_line`` (default: this
    module's logger) and their progress events to ``on_progress``; returns the job's
    :class:`~pd_core.jobs.CheckpointInfo`, or raises the child's error (same type for our own errors).
    torchrun runs in its own process group: if the caller is interrupted (e.g. the Prefect task is
    cancelled), torchrun gets SIGTERM and stops its ranks (checked by hand: no rank outlives it);
    SIGKILL follows after a grace period if it does not exit.
    """
    from pd_core.jobs import CheckpointInfo
    from pd_core.train import ProgressEvent

    if job not in ("teacher", "round"):
        raise ValueError(f"job must be 'teacher' or 'round'; got {job!r}")
    if job == "round" and (round_index is None or teacher is None):
        raise ValueError("job='round' needs round_index and teacher (the teacher's CheckpointInfo)")
    nproc = int(nproc if nproc is not None else cfg.runtime.nproc)
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1; got {nproc}")
    device = getattr(cfg.runtime, "device", "auto")
    if device != "cpu" and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"runtime.nproc={nproc} but this machine has {torch.cuda.device_count()} CUDA devices; "
                         f"lower runtime.nproc")
    log_line = log_line or (lambda line: log.info("%s", line))
    with tempfile.TemporaryDirectory(prefix="pd-ddp-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
        os.chmod(tmpdir / "config.json", 0o600)
        args = ["--config", str(tmpdir / "config.json"), "--job", job, "--out", str(tmpdir / "result.json")]
        if job == "round":
            info = teacher.as_dict() if hasattr(teacher, "as_dict") else dict(teacher)
            (tmpdir / "teacher.json").write_text(json.dumps({k: v for k, v in info.items() if k != "mlflow_run_id"}))
            args += ["--round-index", str(round_index), "--teacher", str(tmpdir / "teacher.json")]
        if fault_at_step is not None:
            args += ["--fault-at-step", str(fault_at_step)]
        cmd = torchrun_command(nproc=nproc, module="pd_core.distributed_job", args=args)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # the folder holding pd_core (works without an install)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("PYTHONUNBUFFERED", "1")
        log.info("data-parallel %s on %d processes: %s", job, nproc, " ".join(cmd[:6]))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
                                start_new_session=True)
        tail: list[str] = []
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                if line.startswith(PROGRESS_PREFIX):
                    if on_progress is not None:
                        on_progress(ProgressEvent(**json.loads(line[len(PROGRESS_PREFIX):])))
                    continue
                tail = (tail + [line])[-40:]
                log_line(line)
            rc = proc.wait()
        except BaseException:
            _terminate_group(proc)
            raise
        result_path = tmpdir / "result.json"
        result = json.loads(result_path.read_text()) if result_path.exists() else None
    if result is not None and result.get("ok"):
        return CheckpointInfo(**result["info"])
    if result is not None:
        raise _rebuild_error(result["error_type"], result["message"])
    raise DistributedJobError(f"torchrun exited with status {rc} and no result; last output:\n" + "\n".join(tail[-15:]))


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


def progress_line(event: Any) -> str:
    """The line a torchrun child prints for one progress event (parsed back by :func:`launch_job`)."""
    return PROGRESS_PREFIX + json.dumps(dataclasses.asdict(event))


__all__ = ["DistInfo", "DistributedJobError", "RankZeroStore", "all_reduce_mean", "current", "default_backend",
           "free_port", "init", "launch_job", "progress_line", "rank_seed", "teardown", "torchrun_command"]
