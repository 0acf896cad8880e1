"""How the suite splits over pytest-xdist workers (``make test``: ``pytest -n 2 --dist loadfile``).

- A work unit is a whole test file, so a module-scoped fixture (a pipeline run, a server) is built once, on one
  worker; files that share an expensive session fixture (``SHARED_UNITS``: one pipeline or teacher for several
  files) form one unit, so that fixture too is built once. Each worker checks at collection that every file
  using a fixture of ``SHARED_SESSION_FIXTURES`` is listed in ``SHARED_UNITS`` (the controller, which schedules,
  sees test ids only).
- Units start heaviest first (``HEAVIEST_FIRST``, from ``--durations``), the rest in collection order, so the
  last units to start are short and the workers finish together. A stale order costs wall time, never a result.
- Each worker is its own process with its own session homes (PD_HOME, PREFECT_HOME, XDG_CONFIG_HOME under a fresh
  temporary folder, tests/conftest.py), its own ``tmp_path`` root and its own servers on free ports, and torch
  on ``cores // workers`` threads (two workers with a thread per core each would only wait on each other).

Without xdist (plain ``pytest``) none of this applies: the order is pytest's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import pytest

# Session fixtures that several files share (a pipeline, a teacher): the files using one run in one unit.
SHARED_SESSION_FIXTURES = frozenset({"smoke_guided", "mn_teacher", "two_node_round"})
SHARED_UNITS = {
    "tests/pipeline/test_guided_run.py": "smoke-guided",
    "tests/test_guided_benchmark.py": "smoke-guided",
    "tests/test_multinode.py": "multinode",
    "tests/test_kubernetes_jobs.py": "multinode",
}

# Test files in the order their units start (heaviest first): the 27 largest units by the sum of their tests'
# --durations in one `make test` (2 workers, 1,376 tests), each 8.5 % down to 0.9 % of that sum; README "Development".
HEAVIEST_FIRST: tuple[str, ...] = (
    "tests/test_guided_benchmark.py",  # with tests/pipeline/test_guided_run.py: one smoke-guided pipeline
    "tests/test_quality_report.py",
    "tests/browser/test_ui.py",
    "tests/pipeline/test_smoke_run.py",
    "tests/pipeline/test_diffusers_teacher_run.py",
    "tests/test_fullstack.py",
    "tests/faults/test_pipeline_on_s3.py",
    "tests/test_kubernetes_jobs.py",  # with tests/test_multinode.py: one teacher, one two-node round
    "tests/pipeline/test_sweep_run.py",
    "tests/faults/test_worker_killed.py",
    "tests/faults/test_prefect_down.py",
    "tests/browser/test_sweep_ui.py",
    "tests/test_ddp.py",
    "tests/faults/test_pipeline_mlflow_down.py",
    "tests/test_prefect_server.py",
    "tests/test_export.py",
    "tests/faults/test_state_outside_workdir.py",
    "tests/test_ablations_benchmark.py",
    "tests/pipeline/test_deployment_chain.py",
    "tests/pipeline/test_kill_resume.py",
    "tests/faults/test_hostile_folders.py",
    "tests/test_gpu_script.py",
    "tests/faults/test_hostile_models.py",
    "tests/test_tracking.py",
    "tests/test_guided_training.py",
    "tests/test_feature_classifier.py",  # the session-scoped classifier, trained once
    "tests/test_tracking_ui.py",
)


def file_of(nodeid: str) -> str:
    """The test file of a test id (``tests/x.py::test_y[p]`` -> ``tests/x.py``)."""
    return nodeid.split("::", 1)[0]


def unit_of(nodeid: str) -> str:
    """The work unit of a test id: its file, or the shared unit that file belongs to."""
    file = file_of(nodeid)
    return SHARED_UNITS.get(file, file)


def unlisted_sharers(tests: Iterable[tuple[str, Sequence[str]]]) -> list[str]:
    """Files that use a shared session fixture, from (test id, fixture names) pairs, but are not in SHARED_UNITS."""
    files = {file_of(nodeid) for nodeid, fixtures in tests if SHARED_SESSION_FIXTURES.intersection(fixtures)}
    return sorted(files - SHARED_UNITS.keys())


def start_order(nodeids: Sequence[str]) -> list[int]:
    """Indices of ``nodeids`` in run order: units by their heaviest file's rank in HEAVIEST_FIRST (unlisted
    last), each unit's tests in collection order, ties in collection order (a stable sort)."""
    rank: dict[str, int] = {}
    for nodeid in nodeids:
        file = file_of(nodeid)
        listed = HEAVIEST_FIRST.index(file) if file in HEAVIEST_FIRST else len(HEAVIEST_FIRST)
        rank[unit_of(nodeid)] = min(rank.get(unit_of(nodeid), listed), listed)
    return sorted(range(len(nodeids)), key=lambda i: rank[unit_of(nodeids[i])])


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist worker: torch on this worker's share of the cores (a test may still set its own count)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1 and hasattr(config, "workerinput"):
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In an xdist worker: refuse a shared session fixture outside SHARED_UNITS; put the units in start order."""
    if not (hasattr(config, "workerinput") or os.environ.get("PYTEST_XDIST_WORKER")):
        return
    missing = unlisted_sharers((item.nodeid, item.fixturenames) for item in items)
    if missing:
        raise pytest.UsageError(f"tests/parallel.py: add {', '.join(missing)} to SHARED_UNITS (they use one of "
                                f"{sorted(SHARED_SESSION_FIXTURES)}), so that fixture is built on one worker only")
    order = start_order([item.nodeid for item in items])
    items[:] = [items[i] for i in order]


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own; without xdist, unused
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadfile`` with the shared units, in the order the workers collected (heaviest first)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class UnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    config.option.loadscopereorder = False  # keep the workers' order (heaviest first), not the most tests first
    return UnitScheduling(config, log)
