"""The quality benchmark's pipeline runs: the ``pd run`` command lines, running them with their output teed
to a log, how long MLflow says they took, and the reproduce command line a report names."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pd_core import jobs
from pd_core.malloc_env import with_malloc_tunables

REPO = Path(__file__).resolve().parents[2]


def pipeline_commands(*, preset: str, work: Path, teacher_uri: str | None = None) -> dict[str, list[str]]:
    """The two ``pd run`` command lines (main and fast ablation), with the work folder made absolute.

    ``teacher_uri``: the main pipeline imports this teacher (e.g. one trained by teacher_curve.py with the
    preset's settings) instead of training its own.
    """
    work = work.resolve()
    common = ["--storage", str(work / "store"), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"]
    teacher = f"file://{work / 'store'}/{jobs.teacher_key(preset)}"
    imported = ["--teacher-uri", teacher_uri] if teacher_uri else []
    return {
        "distilled": ["pd", "run", "--preset", preset, *imported, *common],
        "distilled_fast": ["pd", "run", "--preset", preset, "--name", f"{preset}-fast", "--set", "distill.fast=true",
                           "--teacher-uri", teacher, *common],
    }


def run_pipelines(commands: Mapping[str, list[str]], *, log_dir: Path) -> None:
    """Run each command, its output teed to ``log_dir/<sampler>.log``; stop at the first failure."""
    env = with_malloc_tunables({**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
                                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    log_dir.mkdir(parents=True, exist_ok=True)
    for sampler, cmd in commands.items():
        log_path = log_dir / f"{sampler}.log"
        print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(cmd)}  (log: {log_path})", flush=True)
        t0 = time.perf_counter()
        # `pd` of this interpreter's environment, also when that environment is not on PATH
        exe = shutil.which(cmd[0]) or str(Path(sys.executable).with_name(cmd[0]))
        with open(log_path, "a") as log:
            proc = subprocess.Popen([exe, *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=env)
            assert proc.stdout is not None
            for line in proc.stdout:  # the pipeline's own progress lines (rate, ETA) pass through
                log.write(line)
                log.flush()
                sys.stdout.write(line)
            rc = proc.wait()
        print(f"[{time.strftime('%H:%M:%S')}] exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            raise SystemExit(f"error: {shlex.join(cmd)} exited {rc}; see {log_path} (rerun resumes where it stopped)")


def pipeline_durations(tracking_uri: str, *, pipelines: Sequence[str]) -> dict[str, dict]:
    """Wall time of each pipeline's longest MLflow parent run (the one that trained) and of its latest."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("progressive-distillation")
    out: dict[str, dict] = {}
    if exp is None:
        return out
    for name in pipelines:
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`pd.pipeline` = '{name}' and "
                                                                    f"tags.`pd.kind` = 'pipeline'")
        done = [r for r in runs if r.info.end_time]
        if done:
            longest = max(done, key=lambda r: r.info.end_time - r.info.start_time)
            latest = max(done, key=lambda r: r.info.start_time)
            out[name] = {"longest_run_s": round((longest.info.end_time - longest.info.start_time) / 1000, 1),
                         "longest_run_id": longest.info.run_id,
                         "latest_run_s": round((latest.info.end_time - latest.info.start_time) / 1000, 1)}
    return out


def report_command(*, preset: str, work: Path, teacher_uri: str | None, overrides: Sequence[str] = (),
                   module: str = "benchmarks.quality.reproduce", default_work: Path = REPO / "runs" / "quality") -> str:
    """The reproduce command line that made a report (default options left out; $PWD for the repo)."""
    args = ["python", "-m", module, "--preset", preset, *[arg for o in overrides for arg in ("--set", o)]]
    if Path(work).resolve() != Path(default_work).resolve():
        args += ["--work", str(work)]
    if teacher_uri:
        args += ["--teacher-uri", teacher_uri]
    return shlex.join(args).replace(str(REPO), "$PWD").replace("'", '"')  # double quotes: $PWD stays expandable
