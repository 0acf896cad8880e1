"""Data-parallel jobs from the caller's side: run a teacher or a round in ``nproc`` processes with torchrun.

    launch_job(cfg, job="round", ...)                       the caller's process (e.g. a Prefect task)
      -> python -m torch.distributed.run --standalone --nproc-per-node N -m pd_core.distributed_job ...
         rank r: dist.init() -> jobs.run_round(cfg, store, ...) -> dist.teardown()

``distill.batch_size`` / ``teacher.batch_size`` are per process; the effective batch is batch x nproc
(see ``pd_core.train.batches.rank_batches``). Only rank 0 logs progress and writes checkpoints; the
torchrun child reports progress to the launcher as ``PD_PROGRESS {json}`` lines on stdout and its
result (or error) as a JSON file. Nothing here imports Prefect or MLflow.
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
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from pd_core.config import Config, ConfigError
from pd_core.dist import DistributedJobError
from pd_core.finite import NonFiniteOutputError
from pd_core.jobs import CheckpointInfo, PipelineMismatchError
from pd_core.malloc_env import with_malloc_tunables
from pd_core.store import StorageIOError, StoreError, TransientStorageIOError
from pd_core.train import NonFiniteLossError, ProgressEvent

log = logging.getLogger("pd_core.launch")

PROGRESS_PREFIX = "PD_PROGRESS "  # a torchrun child's progress line: PD_PROGRESS {ProgressEvent as JSON}


# A child's error is re-raised as the same type where it is one of these (task retry conditions depend on it).
_ERROR_TYPES: dict[str, type[BaseException]] = {
    cls.__name__: cls for cls in (NonFiniteLossError, NonFiniteOutputError, PipelineMismatchError, StoreError,
                                  StorageIOError, TransientStorageIOError, ConfigError, ValueError, TimeoutError,
                                  ConnectionError)}


def _rebuild_error(type_name: str, message: str) -> BaseException:
    """The child's error as the same type where it is one of ours, else DistributedJobError."""
    cls = _ERROR_TYPES.get(type_name)
    try:
        return cls(message) if cls is not None else DistributedJobError(f"{type_name}: {message}")
    except TypeError:
        return DistributedJobError(f"{type_name}: {message}")


def torchrun_command(*, nproc: int, module: str, args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m MODULE ARGS`` (this interpreter)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]


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
    teacher's info) or ``jobs.run_round`` (job="round") in ``nproc`` processes.

    Blocks until torchrun exits; relays the children's log lines to ``log_line`` (default: this
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
    with tempfile.TemporaryDirectory(prefix="pd-ddp-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
        os.chmod(tmpdir / "config.json", 0o600)
        args = ["--config", str(tmpdir / "config.json"), "--job", job, "--out", str(tmpdir / "result.json")]
        if job in ("guide", "round"):
            (tmpdir / "teacher.json").write_text(json.dumps(dataclasses.asdict(teacher)))
            args += ["--teacher", str(tmpdir / "teacher.json")]
        if job == "round":
            args += ["--round-index", str(round_index)]
        if fault_at_step is not None:
            args += ["--fault-at-step", str(fault_at_step)]
        cmd = torchrun_command(nproc=nproc, module="pd_core.distributed_job", args=args)
        env = child_env(os.environ)
        log.info("data-parallel %s on %d processes: %s", job, nproc, " ".join(cmd[:6]))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
                                start_new_session=True)
        tail: list[str] = []
        try:
            for raw in proc.stdout:  # stdout=PIPE: never None
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


def progress_line(event: ProgressEvent) -> str:
    """The line a torchrun child prints for one progress event (parsed back by :func:`launch_job`)."""
    return PROGRESS_PREFIX + json.dumps(dataclasses.asdict(event))


