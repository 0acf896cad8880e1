"""The stack's deployments and worker: the project's deploy script run against the stack's Prefect server
(as a user would), and a ``prefect worker start --type process`` configured by environment only, as the
compose ``worker`` service is (PD_STORAGE, MLFLOW_TRACKING_URI, the S3 endpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

from .common import ROOT, StackError, clean_env, log
from .info import StackInfo
from .processes import Service, basic_auth_header, open_http, spawn, wait_until
from .servers import env_bin

WORKER_NAME = "fullstack-worker"


def run_deploy(*, info: StackInfo, pool: str, extra_args: Sequence[str],
               timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``python -m deployments.deploy`` into work pool ``pool``, its stdout + stderr written to ``logs/deploy.log``.

    StackError with the output when it fails or takes over ``timeout_s``."""
    env = clean_env(**info.prefect_client_env(), PREFECT_HOME=str(info.workdir / "deploy-home"))
    cmd = [sys.executable, "-m", "deployments.deploy", "--pool", pool, "--gpus", "0",
           "--code-dir", str(ROOT), *extra_args]
    log(f"deploy: {' '.join(cmd[1:])}")
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        output = f"{exc.stdout or ''}{exc.stderr or ''}"
        raise StackError(f"deploy did not finish in {timeout_s:.0f} s:\n{output}") from exc
    output = result.stdout + result.stderr
    (info.workdir / "logs" / "deploy.log").write_text(output)
    if result.returncode != 0:
        raise StackError(f"deploy failed ({result.returncode}):\n{output[-4000:]}")
    return result


def spawn_worker(*, info: StackInfo, pool: str, poll_s: float) -> Service:
    """The process worker of ``pool``, storing checkpoints at ``info.storage``, polling every ``poll_s``."""
    env = clean_env(
        **info.prefect_client_env(),
        **info.s3_env(),
        PREFECT_HOME=str(info.workdir / "worker-prefect-home"),
        # Pick up new flow runs quickly (defaults: 10 s).
        PREFECT_WORKER_QUERY_SECONDS=str(poll_s),
        PREFECT_WORKER_PREFETCH_SECONDS=str(poll_s),
        PREFECT_LOGGING_LEVEL="INFO",
        MLFLOW_TRACKING_URI=info.mlflow_url,
        PD_STORAGE=info.storage,
        PD_HOME=str(info.worker_pd_home),
        # s3fs reads the endpoint from fsspec's env config, botocore from AWS_ENDPOINT_URL_S3.
        FSSPEC_S3_ENDPOINT_URL=info.s3_url,
        AWS_ENDPOINT_URL_S3=info.s3_url,
    )
    cmd = [env_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--install-policy", "never",
           "--name", WORKER_NAME]
    return spawn("worker", cmd, env=env, log_path=info.workdir / "logs" / "worker.log")


def wait_online(*, info: StackInfo, pool: str, service: Service, timeout_s: float) -> None:
    """Wait (``timeout_s`` at most) until the Prefect server lists the worker ONLINE in ``pool``."""
    url = f"{info.prefect_api_url}/work_pools/{pool}/workers/filter"
    headers = {**basic_auth_header(info.prefect_auth_string), "Content-Type": "application/json"}

    def online() -> bool:
        try:
            with open_http(url, data=b"{}", headers=headers, method="POST", timeout=5) as response:
                workers = json.loads(response.read())
        except (OSError, ValueError):
            return False
        return any(w.get("name") == WORKER_NAME and w.get("status") == "ONLINE" for w in workers)

    wait_until("worker", online, timeout_s=timeout_s, services=(service,))
