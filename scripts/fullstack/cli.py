"""The team-server stack without Docker: the same kinds of servers as docker-compose.yml, on loopback.

The command line of ``python scripts/fullstack_services.py`` (see the package's docstring).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

from .common import S3_ACCESS_KEY, S3_SECRET_KEY
from .reaper import reap
from .stack import FullStack


def main(argv: list[str] | None = None) -> int:
    """Start the stack, print how to use it, wait for Ctrl-C."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="logs and state (default: a new temp dir)")
    p.add_argument("--pool", default="fullstack-pool")
    p.add_argument("--storage", default="s3://checkpoints/pd")
    p.add_argument("--no-worker", action="store_true", help="servers only: no deploy, no worker")
    p.add_argument("--ui", action="store_true", help="serve the Prefect UI")
    p.add_argument("--reap", default=None, help=argparse.SUPPRESS)  # internal: the reaper process
    p.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reap:
        return reap(Path(args.reap), args.parent)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pd-fullstack-"))
    with FullStack(workdir, ui=args.ui) as stack:
        if not args.no_worker:
            stack.deploy(pool=args.pool)
            stack.start_worker(pool=args.pool, storage=args.storage)
        i = stack.info
        print(f"\nPrefect API   {i.prefect_api_url}   (PREFECT_API_AUTH_STRING={i.prefect_auth_string})")
        print(f"MLflow        {i.mlflow_url}")
        print(f"S3 (moto)     {i.s3_url}   (AWS_ACCESS_KEY_ID={S3_ACCESS_KEY} AWS_SECRET_ACCESS_KEY={S3_SECRET_KEY})")
        print(f"Postgres      127.0.0.1:{i.postgres_port}")
        print(f"logs          {workdir / 'logs'}\n")
        print(f"export PREFECT_API_URL={i.prefect_api_url} PREFECT_API_AUTH_STRING={i.prefect_auth_string}")
        if not args.no_worker:
            print("prefect deployment run train-teacher/pd-teacher -p preset=smoke -p name=demo")
        print(f"(logs are kept in {workdir})\n")
        print("Ctrl-C stops everything.")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0
