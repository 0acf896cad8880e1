"""Shared pieces of the multi-node tests: the smoke config of a tiny round, its teacher, one two-node round.

Session-scoped, so tests/test_multinode.py and tests/test_kubernetes_jobs.py train the teacher and the
uninterrupted two-node round (two torchrun agents on 127.0.0.1) once between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pd_core import jobs, launch
from pd_core.config import Config, load_config
from pd_core.store import CheckpointStore


def round_cfg(store, name: str, *, nodes: int = 2, nproc: int = 1, batch: int = 16,
              extra: Sequence[str] = ()) -> Config:
    """6 distillation updates of the smoke U-Net, in-round state at update 3, global batch ``batch x nproc``."""
    return load_config(preset="smoke", overrides=[
        f"pipeline.name={name}", f"storage.root={store}", "teacher.updates=4", "teacher.checkpoint_every=100",
        "teacher.batch_size=16", "distill.updates_per_round=6", "distill.log_every=2", "distill.checkpoint_every=3",
        f"distill.batch_size={batch}", f"runtime.nproc={nproc}", f"runtime.nodes={nodes}", "runtime.max_restarts=2",
        "runtime.threads=1", "eval.enabled=false", *extra])


@pytest.fixture(scope="session")
def mn_teacher(tmp_path_factory):
    """(store root, the teacher's CheckpointInfo), trained in this process."""
    store = tmp_path_factory.mktemp("multinode") / "store"
    return store, jobs.ensure_teacher(round_cfg(store, "mn-teacher", nodes=1), CheckpointStore(str(store)))


@pytest.fixture(scope="session")
def two_node_round(mn_teacher):
    """(store, teacher, the uninterrupted two-node round's CheckpointInfo, its log lines)."""
    store, teacher = mn_teacher
    lines: list[str] = []
    info = launch.launch_job(round_cfg(store, "mn-two"), job="round", round_index=1, teacher=teacher,
                             log_line=lines.append)
    return store, teacher, info, lines
