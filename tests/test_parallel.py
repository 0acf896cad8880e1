"""tests/parallel.py: the suite's work units under pytest-xdist and the order they start in."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import parallel

ROOT = Path(__file__).resolve().parents[1]


def test_a_unit_is_a_file_or_the_shared_unit_its_file_belongs_to():
    assert parallel.unit_of("tests/test_schedule.py::test_endpoints_float64") == "tests/test_schedule.py"
    assert parallel.unit_of("tests/store/test_leases.py::test_x[a::b]") == "tests/store/test_leases.py"
    assert parallel.unit_of("tests/test_multinode.py::test_a") == parallel.unit_of("tests/test_kubernetes_jobs.py::b")
    guided = parallel.unit_of("tests/pipeline/test_guided_run.py::u")
    assert parallel.unit_of("tests/test_guided_benchmark.py::t") == guided != "tests/test_guided_benchmark.py"


def test_a_file_using_a_shared_session_fixture_outside_the_shared_units_is_named():
    tests = [("tests/test_multinode.py::a", ["mn_teacher", "tmp_path"]), ("tests/test_new.py::b", ["two_node_round"]),
             ("tests/test_new.py::c", ["tmp_path"]), ("tests/test_other.py::d", ["prefect_api"])]
    assert parallel.unlisted_sharers(tests) == ["tests/test_new.py"]
    assert parallel.unlisted_sharers(tests[:1] + tests[2:]) == []


def test_units_start_in_the_listed_order_then_collection_order_and_keep_their_tests_in_order(monkeypatch):
    monkeypatch.setattr(parallel, "HEAVIEST_FIRST", ("tests/c.py", "tests/test_kubernetes_jobs.py"))
    ids = ["tests/a.py::1", "tests/test_multinode.py::2", "tests/b.py::3", "tests/c.py::4", "tests/a.py::5",
           "tests/test_kubernetes_jobs.py::6", "tests/c.py::7"]
    order = [ids[i] for i in parallel.start_order(ids)]
    # c.py first; the multinode unit (ranked by its listed file) next, both files; then a.py and b.py as collected.
    assert order == ["tests/c.py::4", "tests/c.py::7", "tests/test_multinode.py::2", "tests/test_kubernetes_jobs.py::6",
                     "tests/a.py::1", "tests/b.py::3", "tests/a.py::5"]
    assert sorted(parallel.start_order(ids)) == list(range(len(ids)))  # a permutation: nothing lost or repeated


def test_every_listed_file_exists_and_every_file_naming_a_shared_fixture_is_in_a_shared_unit():
    listed = set(parallel.HEAVIEST_FIRST) | set(parallel.SHARED_UNITS)
    assert all((ROOT / f).is_file() for f in listed), sorted(f for f in listed if not (ROOT / f).is_file())
    assert len(parallel.HEAVIEST_FIRST) == len(set(parallel.HEAVIEST_FIRST))
    names = re.compile(r"\b(" + "|".join(sorted(parallel.SHARED_SESSION_FIXTURES)) + r")\b")
    users = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
             if p.name != "test_parallel.py" and names.search(p.read_text())}
    assert users == set(parallel.SHARED_UNITS), "tests/parallel.py SHARED_UNITS is out of date"


def test_make_test_runs_on_two_workers_with_file_units():
    makefile = (ROOT / "Makefile").read_text()
    target = makefile.split("\ntest: setup\n", 1)[1].split("\n", 1)[0]
    assert "-n $(TEST_WORKERS)" in target and "--dist loadfile" in target, target  # the units of tests/parallel.py
    assert re.search(r"^TEST_WORKERS \?= 2$", makefile, re.M)


def test_a_worker_runs_torch_on_its_share_of_the_cores_and_a_plain_run_is_left_alone(monkeypatch):
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 8)
    worker, controller = SimpleNamespace(workerinput={"workerid": "gw0"}), SimpleNamespace()
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    parallel.pytest_configure(worker)
    parallel.pytest_configure(controller)  # the controller runs no test
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "16")
    parallel.pytest_configure(worker)  # more workers than cores: still one thread each
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT")
    parallel.pytest_configure(worker)
    assert calls == [4, 1]


def test_with_dist_loadfile_the_scheduler_keeps_shared_units_together_in_the_workers_order():
    pytest.importorskip("xdist")
    values = {"dist": "loadfile", "tx": ["2*popen"]}
    config = SimpleNamespace(getvalue=values.get, option=SimpleNamespace(loadscopereorder=True))
    sched = parallel.pytest_xdist_make_scheduler(config, None)
    assert sched._split_scope("tests/test_kubernetes_jobs.py::a") == sched._split_scope("tests/test_multinode.py::b")
    assert sched._split_scope("tests/test_schedule.py::test_x[1]") == "tests/test_schedule.py"
    assert config.option.loadscopereorder is False  # units start in the order the workers collected them
    values["dist"] = "load"
    assert parallel.pytest_xdist_make_scheduler(config, None) is None  # other modes are xdist's own
