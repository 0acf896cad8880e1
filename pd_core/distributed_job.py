"""One process of a data-parallel job; started by torchrun (see :func:`pd_core.launch.launch_job`).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m pd_core.distributed_job \\
        --config cfg.json --job round --round-index 1 --teacher teacher.json --out result.json

``--config`` is a resolved Config as JSON (``cfg.model_dump(mode="json")``), ``--teacher`` the
teacher's CheckpointInfo as JSON. Rank 0 prints progress as ``PD_PROGRESS {json}`` lines and
writes ``{"ok": true, "info": CheckpointInfo}`` or ``{"ok": false, "error_type", "message"}`` to --out
(a path, or an fsspec URL read with ``storage.storage_options``). Under torchrun's ``--max-restarts``
a restarted job runs this again from the start: the job resumes from rank 0's last in-round state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from pd_core import dist, jobs
from pd_core.config import validate_config
from pd_core.launch import progress_line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pd_core.distributed_job", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="resolved config as JSON (a path, or env:NAME)")
    p.add_argument("--job", required=True, choices=("teacher", "guide", "round"))
    p.add_argument("--round-index", type=int, help="round number (job=round)")
    p.add_argument("--teacher", help="the teacher's CheckpointInfo as JSON, a path or env:NAME "
                                          "(job=guide, job=round)")
    p.add_argument("--out", required=True, help="where rank 0 writes the result JSON")
    p.add_argument("--fault-at-step", type=int, help="inject a NaN loss at this update (tests only)")
    return p


# Test hook: rank 0's worker SIGKILLs itself at its first progress event at or after this update, on the
# job's first attempt only (TORCHELASTIC_RESTART_COUNT 0). Never set in production.
SIGKILL_AT_ENV = "PD_TEST_SIGKILL_AT_STEP"


def _write(path: str, doc: dict, *, storage_options: dict | None = None) -> None:
    if "://" in path:
        import fsspec  # lazy: the result goes to object storage only on a cluster

        with fsspec.open(path, "w", **(storage_options or {})) as f:
            f.write(json.dumps(doc))
        return
    tmp = Path(path).with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _read(source: str) -> str:
    """A file's text, or with ``env:NAME`` the environment variable NAME's (how a pod gets its job's JSON)."""
    if source.startswith("env:"):
        return os.environ[source[len("env:"):]]
    return Path(source).read_text()


def _sigkill_hook() -> int | None:
    value = os.environ.get(SIGKILL_AT_ENV)
    return int(value) if value and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" else None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # CPU (oneDNN) returns some 1x1-conv weight gradients with equivalent but differently written strides; DDP
    # then copies them into its bucket (a few KB) and warns once per process in every job's log: benign.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    info = dist.init()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format=f"[rank {info.rank}] %(message)s" if info.world_size > 1 else "%(message)s")
    options: dict | None = None
    try:
        cfg = validate_config(json.loads(_read(args.config)))
        options = cfg.storage.storage_options
        store = jobs.open_store(cfg)  # every rank reads; jobs write on rank 0 only
        kill_at = _sigkill_hook()

        def progress(event) -> None:
            print(progress_line(event), flush=True)
            if kill_at is not None and event.step >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        on_progress = progress if info.is_main else None
        if args.job == "teacher":
            result = jobs.ensure_teacher(cfg, store, on_progress=on_progress, fault_at_step=args.fault_at_step)
        elif args.job == "guide":
            if args.teacher is None:
                raise ValueError("--job guide needs --teacher")
            teacher = jobs.CheckpointInfo(**json.loads(_read(args.teacher)))
            result = jobs.run_guide_distill(cfg, store, teacher=teacher, on_progress=on_progress,
                                            fault_at_step=args.fault_at_step)
        else:
            if args.round_index is None or args.teacher is None:
                raise ValueError("--job round needs --round-index and --teacher")
            teacher = jobs.CheckpointInfo(**json.loads(_read(args.teacher)))
            result = jobs.run_round(cfg, store, round_index=args.round_index, teacher=teacher,
                                    on_progress=on_progress, fault_at_step=args.fault_at_step)
        if info.is_main:
            _write(args.out, {"ok": True, "info": dataclasses.asdict(result)}, storage_options=options)
        return 0
    except Exception as err:  # noqa: BLE001 - every error goes to the launcher as (type, message)
        if info.is_main:
            _write(args.out, {"ok": False, "error_type": type(err).__name__, "message": str(err)},
                   storage_options=options)
        logging.getLogger(__name__).error("rank %d: %s: %s", info.rank, type(err).__name__, err)
        return 1
    finally:
        dist.teardown()


if __name__ == "__main__":
    sys.exit(main())
