"""Shared helpers of the speed benchmarks: interleaved timing, the results file, machine description.

Timings on a shared machine drift: every ratio is measured side by side in one process, the
compared variants interleaved within each repeat, and reported as the median.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results.csv")
COLUMNS = ("benchmark", "device", "value", "unit", "command")


def device_name(device: torch.device | str = "cpu") -> str:
    """``cpu`` or the GPU's name (the results file's device column)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def machine() -> str:
    """One line: CPU model, cores, threads torch uses, torch and Python versions."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of ``fn`` (device work included in wall)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 2,
                device: torch.device | str = "cpu") -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall, CPU) times of each function, called in turn within every repeat (drift hits all alike).

    CPU time (``time.process_time``) is the robust measure of single-threaded CPU work on a shared
    machine: it does not count the time the process waits for a core. Wall time is what a user waits.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = timed(fn, device)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def median(values: list[float]) -> float:
    return statistics.median(values)


def command() -> str:
    """How this benchmark was started, e.g. ``python -m benchmarks.speed.step_ratio --repeats 15``."""
    main = sys.modules["__main__"]
    module = main.__spec__.name if getattr(main, "__spec__", None) else sys.argv[0]
    return " ".join(["python -m", module, *sys.argv[1:]])


def write_rows(rows: list[dict], path: Path = RESULTS) -> None:
    """Merge rows into the results CSV: a row replaces the one with the same (benchmark, device)."""
    existing: list[dict] = []
    if path.exists():
        with path.open(newline="") as f:
            existing = list(csv.DictReader(f))
    new = {(r["benchmark"], r["device"]): r for r in rows}
    merged = [new.pop((r["benchmark"], r["device"]), r) for r in existing]
    merged += [r for r in rows if (r["benchmark"], r["device"]) in new]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in merged:
            writer.writerow({k: r[k] for k in COLUMNS})
    for r in rows:
        print(f"{r['benchmark']:48s} {r['device']:10s} {r['value']:>12} {r['unit']}")


def row(benchmark: str, value: float, unit: str, *, device: str = "cpu", digits: int = 4) -> dict:
    return {"benchmark": benchmark, "device": device, "value": f"{value:.{digits}g}", "unit": unit,
            "command": command()}
