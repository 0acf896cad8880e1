"""pd_core.train.threads: torch threads follow the cores other processes leave idle (runtime.threads null on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from pd_core.config import RuntimeConfig
from pd_core.train import resolve_runtime
from pd_core.train.threads import AdaptiveThreads, busy_seconds, threads_for

HZ = os.sysconf("SC_CLK_TCK")


def _stat(busy_jiffies: int, idle_jiffies: int) -> str:
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    return (f"cpu  {busy_jiffies} 0 0 {idle_jiffies} 0 0 0 0 0 0\n"
            f"cpu0 {busy_jiffies} 0 0 {idle_jiffies} 0 0 0 0 0 0\nintr 1 2 3\n")


class FakeMachine:
    """A 2-core machine: ``others`` cores busy (of other processes) while this process uses ``own`` cores."""

    def __init__(self) -> None:
        self.t, self.busy, self.own_cpu, self.others, self.own = 0.0, 0.0, 0.0, 0.0, 1.0
        self.set_calls: list[int] = []

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.busy += (self.others + self.own) * seconds
        self.own_cpu += self.own * seconds

    def governor(self, **kw) -> AdaptiveThreads:
        return AdaptiveThreads(cores=2, window_s=10.0, probe_s=0.5, read_stat=lambda: _stat(round(self.busy * HZ), 0),
                               own_cpu=lambda: self.own_cpu, clock=lambda: self.t, sleep=self.advance,
                               set_threads=self.set_calls.append, **kw)


def test_threads_are_the_cores_others_leave_idle_and_never_zero():
    assert threads_for(cores=2, others=0.0) == 2
    assert threads_for(cores=2, others=0.4) == 2  # a little background work keeps both
    assert threads_for(cores=2, others=0.6) == 1
    assert threads_for(cores=2, others=1.0) == 1
    assert threads_for(cores=2, others=7.5) == 1  # an overloaded machine still gets one thread
    assert threads_for(cores=8, others=2.4) == 6
    assert threads_for(cores=1, others=0.0) == 1


def test_busy_seconds_count_every_state_but_idle_and_iowait():
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user already
    stat = "cpu  100 20 30 4000 50 5 5 0 40 0\ncpu0 1 2 3 4\n"
    assert busy_seconds(stat) == pytest.approx((100 + 20 + 30 + 5 + 5) / HZ)


def test_an_idle_machine_gets_every_core_and_a_busy_one_drops_to_one_thread_until_it_is_idle_again():
    m = FakeMachine()
    g = m.governor()
    assert g.threads == 2 and m.set_calls == [2]  # decided over the start-up probe: nothing else ran
    m.advance(6.0)
    m.others = 1.0  # another process takes a core 6 s into the 10-s window
    m.advance(3.0)
    assert g.update() == 2 and m.set_calls == [2]  # within the window: no new decision
    m.advance(1.0)
    assert g.update() == 2 and g.others == pytest.approx(0.4)  # 0.4 of a core on average: keep both, for now
    m.advance(10.0)
    assert g.update() == 1 and g.others == pytest.approx(1.0) and m.set_calls == [2, 1]
    m.advance(10.0)
    assert g.update() == 1 and m.set_calls == [2, 1]  # unchanged: not set again
    m.others, m.own = 0.0, 2.0  # the other process ends; our own two threads are not "others"
    m.advance(10.0)
    assert g.update() == 2 and g.others == pytest.approx(0.0) and m.set_calls == [2, 1, 2]


def test_without_a_readable_proc_stat_it_keeps_one_thread():
    calls: list[int] = []

    def unreadable() -> str:
        raise OSError("no /proc")

    g = AdaptiveThreads(cores=4, read_stat=unreadable, set_threads=calls.append, sleep=lambda s: None)
    assert g.threads == 1 and calls == [1] and g.update(force=True) == 1


def test_null_threads_on_a_cpu_follow_the_load_and_a_number_is_a_fixed_count():
    fixed = resolve_runtime(RuntimeConfig(device="cpu", threads=1))
    assert fixed.threads is None and torch.get_num_threads() == 1
    adaptive = resolve_runtime(RuntimeConfig(device="cpu"))
    assert isinstance(adaptive.threads, AdaptiveThreads)
    assert 1 <= adaptive.threads.threads <= adaptive.threads.cores
    assert torch.get_num_threads() == adaptive.threads.threads  # measured on this machine, then applied
    torch.set_num_threads(adaptive.threads.threads + 1)  # a job with a fixed count ran in this process since
    again = resolve_runtime(RuntimeConfig(device="cpu"))
    assert again.threads is adaptive.threads and torch.get_num_threads() == adaptive.threads.threads
    torch.set_num_threads(1)
