"""Register the pipeline on a running Prefect server: work pool, GPU limit, deployments, triggers.

    PREFECT_API_URL=http://localhost:4200/api python -m deployments.deploy --pool gpu-pool --gpus 1
    ... python -m deployments.deploy --pool-type kubernetes --pool pd-k8s --gpus 1 --image REGISTRY/pd-worker:TAG

Reads deployments/prefect.yaml (the one declaration of deployments, schedules and triggers) and,
idempotently (rerun it after every change):
1. creates the work pool if it is missing: a process pool, or with --pool-type kubernetes a
   prefect-kubernetes pool whose base job template is deployments/kubernetes_pool.py's (an existing
   pool keeps its settings, except --pool-concurrency when given);
2. sets the tag concurrency limit `gpu` to the number of GPUs, so at most one task run tagged
   `gpu` runs per GPU whatever the number of flow runs;
3. creates or updates each deployment: its flow is loaded from --project-dir by entrypoint
   (flows are imported only here, lazily), the worker is pointed at --code-dir, and its triggers
   become automations owned by the deployment (replaced, not duplicated, on each run);
4. with --notify-block, the automation `pd-round-notify` (deployments/automation.py): every finished
   round sent to that notification block by the server, with no flow run. The `pd-notify` flow
   deployment (a flow run per round: a log line and an artifact) is deployed only with --notify-flow.

`--dry-run` prints the resolved plan as JSON, without a server and without importing the flows.
Exit codes: 0 ok, 2 bad arguments or configuration, 1 the server refused something.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

PROJECT_DIR = Path(__file__).resolve().parents[1]
SPEC_PATH = Path(__file__).with_name("prefect.yaml")

# Deployments whose default parameters take --preset / --set.
PIPELINE_DEPLOYMENTS = ("pd-teacher", "pd-distill")
SWEEP_DEPLOYMENT = "pd-sweep"  # runs pd-distill once per grid point; gets the same defaults
NOTIFY_DEPLOYMENT = "pd-notify"


class DeployError(Exception):
    """A one-line, user-facing reason to stop (bad arguments, spec or server state)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m deployments.deploy",
        description="Register work pool, GPU concurrency limit, deployments and triggers.",
    )
    p.add_argument("--pool", default=None, help="work pool name (default: the spec's, gpu-pool)")
    p.add_argument("--pool-type", choices=("process", "kubernetes"), default="process",
                   help="process: flow runs are processes on the worker host; kubernetes: each flow run is a "
                        "Kubernetes Job (prefect-kubernetes; see deployments/kubernetes_pool.py)")
    p.add_argument("--image", default=None, help="kubernetes pool: the project image the flow-run pods run")
    p.add_argument("--namespace", default=None, help="kubernetes pool: namespace of the flow-run Jobs")
    p.add_argument("--env-secret", default="pd-env",
                   help="kubernetes pool: Secret whose keys become the pods' environment (S3, MLflow)")
    p.add_argument(
        "--gpus", type=int, default=1,
        help="GPUs on the worker host: the `gpu` tag limit and default CUDA_VISIBLE_DEVICES "
        "0..N-1; 0 = CPU only (CUDA_VISIBLE_DEVICES='', one `gpu` task at a time)",
    )
    p.add_argument(
        "--cuda-visible-devices", default=None,
        help="CUDA_VISIBLE_DEVICES for the flow runs (default: derived from --gpus)",
    )
    p.add_argument("--gpu-tag", default="gpu", help="task tag whose concurrency is limited")
    p.add_argument(
        "--pool-concurrency", type=int, default=None,
        help="also cap concurrent flow runs in the pool (default: leave the pool's setting)",
    )
    p.add_argument(
        "--code-dir", default=None,
        help="where the WORKER finds this project (default: $PD_CODE_DIR, else this checkout; "
        "the image's /opt/pd on a kubernetes pool)",
    )
    p.add_argument(
        "--project-dir", default=str(PROJECT_DIR),
        help="where flows are loaded from at deploy time (default: this checkout)",
    )
    p.add_argument("--preset", default=None, help="default `preset` of pd-teacher / pd-distill")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="default `overrides` of pd-teacher / pd-distill (repeatable)",
    )
    p.add_argument(
        "--storage", default=os.environ.get("PD_STORAGE") or None, metavar="URL",
        help="default `storage` of pd-teacher / pd-distill (default: $PD_STORAGE; '' = none)",
    )
    p.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or None, metavar="URI",
        help="default `tracking_uri` of pd-teacher / pd-distill, as the WORKER reaches MLflow "
        "(default: $MLFLOW_TRACKING_URI; '' = none)",
    )
    p.add_argument("--cron", default=None, help="cron expression of pd-distill's schedule")
    p.add_argument("--timezone", default=None, help="IANA timezone of the schedule")
    p.add_argument(
        "--schedule-active", action=argparse.BooleanOptionalAction, default=None,
        help="activate (or deactivate) pd-distill's schedule (default: as in the spec: inactive)",
    )
    p.add_argument(
        "--notify-block", default=None, metavar="TYPE/NAME",
        help="notification block the automation pd-round-notify sends each finished round to "
        "(e.g. slack-webhook/team); no flow runs",
    )
    p.add_argument("--notify-flow", action="store_true",
                   help="also deploy pd-notify: a flow run per finished round (log line and artifact)")
    p.add_argument("--no-notify", action="store_true", help="deploy no notification (the default without "
                                                             "--notify-block and --notify-flow)")
    p.add_argument("--spec", default=str(SPEC_PATH), help="the deployment spec (prefect.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; contact nothing")
    args = p.parse_args(argv)
    if args.code_dir is None:
        in_image = args.pool_type == "kubernetes"
        args.code_dir = "/opt/pd" if in_image else os.environ.get("PD_CODE_DIR") or str(PROJECT_DIR)
    if args.gpus < 0:
        p.error(f"--gpus must be >= 0, got {args.gpus}")
    if args.pool_concurrency is not None and args.pool_concurrency < 1:
        p.error(f"--pool-concurrency must be >= 1, got {args.pool_concurrency}")
    for item in args.overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            p.error(f"--set expects KEY=VALUE, got {item!r}")
    return args


def load_spec(path: str | Path) -> dict[str, Any]:
    """The parsed prefect.yaml, checked for the fields this script relies on."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DeployError(f"cannot read deployment spec {path}: {exc}") from exc
    deployments = spec.get("deployments") if isinstance(spec, dict) else None
    if not isinstance(deployments, list) or not deployments:
        raise DeployError(f"{path}: no `deployments:` list")
    for i, d in enumerate(deployments):
        for key in ("name", "entrypoint"):
            if not isinstance(d.get(key), str):
                raise DeployError(f"{path}: deployments[{i}].{key} must be a string")
    return spec


def cuda_visible_devices(gpus: int, explicit: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for flow runs: explicit, else "0,...,gpus-1" ("" for CPU only)."""
    if explicit is not None:
        return explicit
    return ",".join(str(i) for i in range(gpus))


def plan(spec: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The deployments to register, fully resolved from the spec and the arguments (pure)."""
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from pydantic import TypeAdapter, ValidationError

    trigger_adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
    devices = cuda_visible_devices(args.gpus, args.cuda_visible_devices)
    out: list[dict[str, Any]] = []
    for d in spec["deployments"]:
        name = d["name"]
        if name == NOTIFY_DEPLOYMENT and (args.no_notify or not args.notify_flow):
            continue
        parameters = dict(d.get("parameters") or {})
        if name in (*PIPELINE_DEPLOYMENTS, SWEEP_DEPLOYMENT):
            parameters["task_tags"] = [args.gpu_tag]  # the tag whose concurrency limit this script sets
            if args.preset is not None:
                parameters["preset"] = args.preset
            if args.overrides:
                parameters["overrides"] = list(args.overrides)
            if args.storage:
                parameters["storage"] = args.storage
            if args.tracking_uri:
                parameters["tracking_uri"] = args.tracking_uri
        work_pool = d.get("work_pool") or {}
        job_variables = json.loads(json.dumps(work_pool.get("job_variables") or {}))
        env = job_variables.get("env")
        if isinstance(env, dict) and "CUDA_VISIBLE_DEVICES" in env:
            env["CUDA_VISIBLE_DEVICES"] = devices
        if args.pool_type == "kubernetes":
            from deployments.kubernetes_pool import deployment_job_variables

            job_variables = deployment_job_variables(job_variables, gpus=args.gpus)
        schedules = []
        for s in d.get("schedules") or []:
            s = dict(s)
            if "cron" not in s:
                raise DeployError(f"{name}: only cron schedules are supported, got {s}")
            if name == "pd-distill":
                if args.cron is not None:
                    s["cron"] = args.cron
                if args.timezone is not None:
                    s["timezone"] = args.timezone
                if args.schedule_active is not None:
                    s["active"] = args.schedule_active
            schedules.append(s)
        triggers = []
        for t in d.get("triggers") or []:
            try:
                trigger_adapter.validate_python(t)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                raise DeployError(
                    f"{name}: trigger {t.get('name')!r}: {where}: {first['msg']}"
                ) from exc
            triggers.append(t)
        out.append({
            "name": name,
            "entrypoint": d["entrypoint"],
            "description": " ".join(str(d.get("description") or "").split()) or None,
            "tags": list(d.get("tags") or []),
            "parameters": parameters,
            "work_pool": args.pool or work_pool.get("name") or "gpu-pool",
            "job_variables": job_variables,
            "schedules": schedules,
            "triggers": triggers,
        })
    return out


def pool_template(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The base job template and description of a new pool of type ``args.pool_type``."""
    if args.pool_type == "kubernetes":
        from deployments.kubernetes_pool import base_job_template

        return (base_job_template(image=args.image, namespace=args.namespace, env_secret=args.env_secret),
                "Progressive-distillation flow runs (one Kubernetes Job each)")
    from prefect.workers.process import ProcessWorker

    return (ProcessWorker.get_default_base_job_template(),
            "Progressive-distillation flow runs (process worker on the GPU host)")


def ensure_work_pool(client: Any, name: str, *, concurrency: int | None, pool_type: str = "process",
                     template: tuple[dict[str, Any], str] | None = None) -> str:
    """Create the work pool of ``pool_type`` if missing; returns 'created' or 'exists'."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        base_job_template, description = template or pool_template(argparse.Namespace(pool_type=pool_type))
        client.create_work_pool(
            WorkPoolCreate(
                name=name,
                type=pool_type,
                base_job_template=base_job_template,
                concurrency_limit=concurrency,
                description=description,
            )
        )
        return "created"
    if pool.type != pool_type:
        print(f"warning: work pool {name!r} has type {pool.type!r}, not {pool_type!r}", file=sys.stderr)
    if concurrency is not None and pool.concurrency_limit != concurrency:
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency))
    return "exists"


def _schedule(s: dict[str, Any]) -> Any:
    """A prefect.schedules.Cron from one cron entry of the spec."""
    from prefect.schedules import Cron

    return Cron(
        s["cron"],
        timezone=s.get("timezone"),
        active=bool(s.get("active", True)),
        parameters=s.get("parameters") or None,
        slug=s.get("slug"),
    )


def register(items: list[dict[str, Any]], args: argparse.Namespace) -> list[tuple[str, str]]:
    """Create/update the pool, the GPU limit and the deployments; returns (name, id) pairs."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from prefect.runner.storage import LocalStorage
    from pydantic import TypeAdapter

    trigger_adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
    project_dir = Path(args.project_dir).resolve()
    for item in items:  # before touching the server: all flows must be there
        path = project_dir / item["entrypoint"].split(":", 1)[0]
        if not path.is_file():
            raise DeployError(
                f"{item['name']}: entrypoint {item['entrypoint']!r} not found under {project_dir}"
            )
    pools = sorted({i["work_pool"] for i in items})
    with get_client(sync_client=True) as client:
        for pool in pools:
            state = ensure_work_pool(client, pool, concurrency=args.pool_concurrency, pool_type=args.pool_type,
                                     template=pool_template(args))
            print(f"work pool {pool!r}: {state} (type {args.pool_type})")
        limit = max(args.gpus, 1)
        client.create_concurrency_limit(tag=args.gpu_tag, concurrency_limit=limit)
        print(f"tag concurrency limit {args.gpu_tag!r}: {limit}")

    ids: list[tuple[str, str]] = []
    for item in items:
        flow = Flow.from_source(source=str(project_dir), entrypoint=item["entrypoint"])
        deployment = flow.to_deployment(
            name=item["name"],
            description=item["description"],
            tags=item["tags"],
            parameters=item["parameters"],
            work_pool_name=item["work_pool"],
            job_variables=item["job_variables"],
            schedules=[_schedule(s) for s in item["schedules"]] or None,
            triggers=[trigger_adapter.validate_python(t) for t in item["triggers"]] or None,
        )
        # Where the worker runs the flow from (a set_working_directory pull step).
        deployment.storage = LocalStorage(path=args.code_dir)
        deployment_id = deployment.apply(work_pool_name=item["work_pool"])
        ids.append((f"{flow.name}/{item['name']}", str(deployment_id)))
        print(f"deployment {flow.name}/{item['name']}: {deployment_id}"
              f" (default parameters {json.dumps(item['parameters'])})")
    if args.notify_block and not args.no_notify:
        from deployments.automation import AUTOMATION_NAME, ensure_round_notify_automation

        try:
            with get_client(sync_client=True) as client:
                automation_id = ensure_round_notify_automation(client, block=args.notify_block)
        except ValueError as exc:  # Block.load: no such block
            raise DeployError(f"--notify-block {args.notify_block}: {exc}") from None
        ids.append((AUTOMATION_NAME, str(automation_id)))
        print(f"automation {AUTOMATION_NAME}: {automation_id} (pd.round.completed -> {args.notify_block})")
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m deployments.deploy`."""
    args = parse_args(argv)
    try:
        items = plan(load_spec(args.spec), args)
        if args.dry_run:
            print(json.dumps({
                "pool_type": args.pool_type,
                "gpu_tag": args.gpu_tag,
                "gpu_limit": max(args.gpus, 1),
                "code_dir": args.code_dir,
                "deployments": items,
            }, indent=2))
            return 0
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
        if not api_url:
            raise DeployError(
                "PREFECT_API_URL is not set: point it at the server "
                "(e.g. export PREFECT_API_URL=http://localhost:4200/api); deploying to "
                "Prefect's ephemeral API would register nothing lasting"
            )
        print(f"Prefect API: {api_url}")
        register(items, args)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        import httpx
        from prefect.exceptions import PrefectException

        if not isinstance(exc, (httpx.HTTPError, PrefectException)):
            raise
        # The server refused or is unreachable: say so in one line.
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
