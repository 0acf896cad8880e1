"""Intra-op threads that follow the machine's load: as many as the cores other processes leave idle.

An OpenMP team of T threads splits each operator into T parts and waits for the slowest part at
its end. When another process holds one of the cores, the part on that core waits for a time slice
at every operator, so on a shared 2-core machine a 2-thread update can take several times as long
as a 1-thread one, while on an idle machine 2 threads are faster (benchmarks/speed/threads.py).
``runtime.threads: null`` on a CPU therefore means :class:`AdaptiveThreads`:

    threads = clamp(cores - round(others), 1, cores)

where ``cores`` are the CPUs this process may run on and ``others`` the cores that the rest of the
machine kept busy over the last window: busy time of all CPUs (``/proc/stat``) minus this
process's own CPU time, divided by the window's length. It is decided once at start (over a short
probe) and again whenever a window has passed, at the calls of :meth:`AdaptiveThreads.update`
(every training update and every sampling batch). Where ``/proc/stat`` cannot be read, it keeps
one thread. A changing thread count can change the last bits of CPU results (the order of
reductions), so exact resume needs a fixed ``runtime.threads``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("pd_core.train")


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_seconds(stat: str) -> float:
    """CPU-seconds all CPUs spent busy since boot, from a ``/proc/stat`` text (first line: jiffies)."""
    fields = [int(v) for v in stat.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # guest time is already counted in user / nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def threads_for(*, cores: int, others: float) -> int:
    """Threads for ``cores`` usable CPUs when other processes keep ``others`` cores busy (at least 1)."""
    return max(1, min(cores, cores - int(others + 0.5)))


def _read_stat() -> str:
    return Path("/proc/stat").read_text()


class AdaptiveThreads:
    """Sets torch's intra-op thread count to :func:`threads_for` the measured load, re-decided every ``window_s``."""

    def __init__(self, *, cores: int | None = None, window_s: float = 10.0, probe_s: float = 0.3,
                 read_stat: Callable[[], str] = _read_stat, own_cpu: Callable[[], float] = time.process_time,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        self.cores = cores or usable_cores()
        self.window_s = window_s
        self._read_stat, self._own_cpu, self._clock, self._set = read_stat, own_cpu, clock, set_threads
        self.threads = 1
        self.others = 0.0
        self._mark = self._sample()
        if self._mark is None:
            self._set(1)
            return
        sleep(probe_s)
        self.update(force=True)

    def _sample(self) -> tuple[float, float, float] | None:
        """(clock, machine busy seconds, own CPU seconds), or None where /proc/stat is unreadable."""
        try:
            return self._clock(), busy_seconds(self._read_stat()), self._own_cpu()
        except (OSError, ValueError, IndexError):
            return None

    def reapply(self) -> None:
        """Sets torch's count back to this instance's decision (others may have set it since)."""
        if torch.get_num_threads() != self.threads:
            self._set(self.threads)

    def update(self, *, force: bool = False) -> int:
        """Re-decide when a window has passed (or ``force``); returns the thread count in effect."""
        if self._mark is None or (not force and self._clock() - self._mark[0] < self.window_s):
            return self.threads
        now = self._sample()
        if now is None:
            return self.threads
        wall = now[0] - self._mark[0]
        if wall <= 0:
            return self.threads
        self.others = max(0.0, ((now[1] - self._mark[1]) - (now[2] - self._mark[2])) / wall)
        self._mark = now
        threads = threads_for(cores=self.cores, others=self.others)
        if threads != self.threads or force:
            self._set(threads)
            log.info("torch threads: %d (other processes kept %.1f of %d cores busy)", threads, self.others,
                     self.cores)
            self.threads = threads
        return threads


_PROCESS: list[AdaptiveThreads] = []  # the process's one instance (torch's thread count is per process)


def adaptive_threads() -> AdaptiveThreads:
    """The process's :class:`AdaptiveThreads`, made (and its first decision taken) on first use."""
    if not _PROCESS:
        _PROCESS.append(AdaptiveThreads())
    else:  # a fixed runtime.threads since (another job in this process) may have changed torch's count
        _PROCESS[0].reapply()
    return _PROCESS[0]
