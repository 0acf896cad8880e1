"""tasks.env.attach_pd_core_logs: pd_core's lines go to Prefect's API handlers and to nothing else on prefect.extra."""

import logging

import pytest
from prefect.logging.handlers import APILogHandler

from tasks.env import attach_pd_core_logs


@pytest.fixture
def loggers():
    extra, core = logging.getLogger("prefect.extra"), logging.getLogger("pd_core")
    saved = (list(extra.handlers), list(core.handlers))
    yield extra, core
    extra.handlers[:], core.handlers[:] = saved


def test_only_prefects_api_handlers_are_copied_to_pd_core(loggers):
    extra, core = loggers
    api, other = APILogHandler(), logging.StreamHandler()  # other: e.g. a test harness's capturing handler
    extra.handlers[:] = [api, other]
    core.handlers[:] = []
    attach_pd_core_logs()
    attach_pd_core_logs()  # idempotent
    assert core.handlers == [api]


def test_a_record_reaches_a_root_handler_once_after_the_routing(loggers):
    extra, core = loggers
    seen = []
    catcher = logging.Handler()
    catcher.emit = seen.append
    root = logging.getLogger()
    extra.handlers[:] = [catcher]  # what pytest does: its handler on every non-propagating logger
    core.handlers[:] = []
    attach_pd_core_logs()
    root.addHandler(catcher)
    try:
        logging.getLogger("pd_core.routing_test").warning("one line")
    finally:
        root.removeHandler(catcher)
    assert [r.getMessage() for r in seen] == ["one line"]
