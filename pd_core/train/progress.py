"""Progress lines: training (one event per ``log_every`` updates: loss, lr, rate, ETA) and work over images."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: what a bar, a log line or a Prefect artifact shows."""

    phase: str  # e.g. "teacher" or "round 3 (64->32)"
    step: int  # updates done
    total: int  # updates in this phase
    loss: float  # mean loss since the previous event
    lr: float
    it_per_s: float
    eta_s: float

    def line(self) -> str:
        """One log line: `round 3 (64->32) step 200/1000 loss 0.0123 lr 4.0e-05 8.1 it/s eta 1m39s`."""
        return (f"{self.phase} step {self.step}/{self.total} loss {self.loss:.4g} lr {self.lr:.2e} "
                f"{self.it_per_s:.2f} it/s eta {format_seconds(self.eta_s)}")


def format_seconds(seconds: float) -> str:
    """Human duration: 59s, 3m07s, 2h05m."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"



ProgressCallback = Callable[[ProgressEvent], None]


def images_line(what: str, *, done: int, total: int, elapsed_s: float) -> str:
    """One log line for work over images: `encode: 640/1000 images (64.0%), 12.30 img/s, ETA 29s`."""
    rate = done / max(elapsed_s, 1e-9)
    eta = format_seconds((total - done) / rate) if rate > 0 else "?"
    return f"{what}: {done}/{total} images ({100.0 * done / total:.1f}%), {rate:.2f} img/s, ETA {eta}"
