"""Helpers of the whole-pipeline fault tests: ``pd run`` in subprocesses (embedded Prefect and MLflow), on a
shortened smoke schedule, with a clean environment, and the waits on them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.helpers import REPO

PIPELINE_FAST = ["teacher.updates=20", "teacher.checkpoint_every=10", "distill.start_steps=4",
                 "distill.updates_per_round=6", "distill.checkpoint_every=3", "distill.log_every=3",
                 "eval.num_samples=64", "eval.kid_subset_size=32", "eval.kid_subsets=4", "eval.classifier_epochs=1",
                 "eval.grid_size=2"]


def _pd_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "PD_", "PREFECT_", "MLFLOW_")) and k != "PYTEST_CURRENT_TEST"}
    env.update({"PD_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "PYTHONPATH": str(REPO),
                "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "OMP_NUM_THREADS": "1", **extra})
    return env


def _set_args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@dataclass
class _Proc:
    proc: subprocess.Popen
    stdout: Path
    stderr: Path
    home: Path
    rc: int | None = None
    extra: dict = field(default_factory=dict)

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            self.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"pd run did not finish in {timeout}s: {self.err()[-3000:]}") from None
        return self.rc


def _pd(home: Path, args: list[str], env: dict[str, str], *, prelude: str = "") -> _Proc:
    home.mkdir(parents=True, exist_ok=True)
    code = ("import sys\nfrom tasks.env import prepare_environment\nprepare_environment()\n" + prelude +
            "from flows.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out, err = home.parent / f"{home.name}.out", home.parent / f"{home.name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=o, stderr=e, env=env, cwd=home)
    return _Proc(proc=proc, stdout=out, stderr=err, home=home)


def _wait_for(predicate: Any, proc: _Proc, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.proc.poll() is not None:
            raise AssertionError(f"pd run exited ({proc.proc.returncode}) before {what}: {proc.err()[-3000:]}")
        if time.monotonic() > deadline:
            proc.proc.kill()
            raise AssertionError(f"no {what} after {timeout}s: {proc.err()[-3000:]}")
        time.sleep(0.1)
