"""The team-server stack without Docker: the same kinds of servers as docker-compose.yml, on loopback.

    python scripts/fullstack_services.py            # start everything, print the URLs; Ctrl-C stops it
    python scripts/fullstack_services.py --no-worker --ui

Used by tests/test_fullstack.py. :class:`FullStack` (a context manager, in ``stack``; the servers it spawns
in ``servers``, the deploy script and the worker in ``worker``, their addresses in ``info``) starts, in this order:

1. PostgreSQL (the installed server binaries, a throwaway cluster in a temp dir; as the `postgres`
   user when run as root) with databases `prefect` and `mlflow`, each owned by its own role;
2. a moto S3 server (the S3 API) with buckets `checkpoints` and `mlflow`;
3. `prefect server start` on Postgres (basic auth on, analytics off) and `mlflow server` on
   Postgres with artifacts proxied to `s3://mlflow/` (both started together, then awaited);
4. on request: `python -m deployments.deploy` against that server (work pool, `gpu` tag limit,
   deployments and their triggers) and a `prefect worker start --type process` configured by
   environment only, as the compose worker is (PD_STORAGE, MLFLOW_TRACKING_URI, the S3 endpoint).

Every port is picked free on 127.0.0.1 and every wait is bounded. Each server runs in its own
session; stopping it kills its process group and every descendant that left the group (a process
worker starts flow runs in new sessions). Everything is stopped in reverse order when the `with`
block ends, also on an exception, Ctrl-C or SIGTERM; if the starting process dies without running
that (SIGKILL), a small reaper process kills the servers and deletes the Postgres cluster.
"""

from .common import BUCKETS, S3_ACCESS_KEY, S3_SECRET_KEY, StackError, clean_env, free_port, log, tail
from .info import StackInfo
from .postgres import Postgres, find_pg_bin, stop_cluster
from .processes import Service, descendants, spawn, wait_until
from .reaper import Reaper, reap
from .stack import FullStack

__all__ = [
    "BUCKETS", "S3_ACCESS_KEY", "S3_SECRET_KEY", "FullStack", "Postgres", "Reaper", "Service", "StackError",
    "StackInfo", "clean_env", "descendants", "find_pg_bin", "free_port", "log", "reap", "spawn", "stop_cluster",
    "tail", "wait_until",
]
