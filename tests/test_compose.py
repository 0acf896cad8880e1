"""Static checks of the team-server stack: docker-compose.yml, .env.example, deployments/prefect.yaml.

No Docker engine and no server needed: `docker-compose config` (when installed) validates the
compose file; the rest parses the files. The deployment-trigger test renders the trigger's
parameters exactly as the Prefect server does (its hydration code) against a sample event.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCRIPT = ROOT / "scripts" / "validate_compose.sh"
SPEC = ROOT / "deployments" / "prefect.yaml"

SECRETS = (
    "POSTGRES_PASSWORD",
    "PREFECT_DB_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "PREFECT_API_AUTH_STRING",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
)
SECRET_KEY_RE = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY", re.IGNORECASE)
REQUIRED_REF_RE = re.compile(r"^\$\{(\w+):\?[^}]+\}$")  # ${VAR:?message}
VAR_REF_RE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")
PUBLIC_PORTS = {"prefect-server": 4200, "mlflow": 5000, "s3": 8333}


def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _one_shot(services: dict) -> set[str]:
    """Services others wait for with service_completed_successfully (jobs that exit)."""
    return {
        dep
        for svc in services.values()
        for dep, cond in (svc.get("depends_on") or {}).items()
        if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully"
    }


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


# --- docker-compose config --------------------------------------------------------------------


def test_validate_compose_script_passes():
    if _compose_cmd() is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    res = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("secret", SECRETS)
def test_compose_refuses_to_start_without_each_secret(secret, tmp_path):
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env_file = tmp_path / "env"
    env_file.write_text(
        "\n".join(f"{k}={v}" for k, v in _env_example().items() if k != secret) + "\n"
    )
    res = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "--env-file", str(env_file), "--project-directory", str(ROOT),
         "config", "-q"],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k not in SECRETS},
    )
    assert res.returncode != 0
    assert f"set {secret} in .env" in res.stdout + res.stderr


# --- parsed docker-compose.yml ----------------------------------------------------------------


def test_postgres_is_not_published(services):
    assert "ports" not in services["postgres"]
    assert services["postgres"].get("network_mode") != "host"


def test_only_ui_api_and_s3_are_published_on_bind_addr(services):
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert set(published) == set(PUBLIC_PORTS)
    for name, ports in published.items():
        assert len(ports) == 1
        m = re.fullmatch(r"\$\{BIND_ADDR:-127\.0\.0\.1\}:\$\{\w+:-(\d+)\}:(\d+)", str(ports[0]))
        assert m, f"{name}: {ports[0]!r} must bind to ${{BIND_ADDR:-127.0.0.1}}"
        assert int(m.group(1)) == int(m.group(2)) == PUBLIC_PORTS[name]


def test_every_long_running_service_has_a_healthcheck(services):
    one_shot = _one_shot(services)
    assert one_shot == {"preflight", "s3-init"}
    for name, svc in services.items():
        if name in one_shot:
            assert svc.get("restart") == "no", f"one-shot {name} must not restart"
            continue
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"


def test_depends_on_uses_conditions_on_existing_services(services):
    one_shot = _one_shot(services)
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, cond in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            expected = (
                "service_completed_successfully" if dep in one_shot else "service_healthy"
            )
            assert cond == {"condition": expected}, f"{name} -> {dep}: {cond}"


def test_no_literal_secrets(services):
    for name, svc in services.items():
        for key, value in _env(svc).items():
            if SECRET_KEY_RE.search(key):
                m = REQUIRED_REF_RE.match(value)
                assert m and m.group(1) in SECRETS, f"{name}.{key} must be ${{VAR:?...}} from .env"
            # Credentials inside URLs (user:password@host) must be required variables too.
            for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
                assert REQUIRED_REF_RE.match(password), f"{name}.{key}: literal password in URL"
    assert "change-me" not in yaml.safe_dump(services)
    text = COMPOSE.read_text()
    # No `${SECRET:-default}` anywhere.
    for secret in SECRETS:
        assert f"${{{secret}:-" not in text and f"${{{secret}}}" not in text, secret


def test_secrets_only_come_from_env_example_placeholders():
    env = _env_example()
    for secret in SECRETS:
        assert secret in env, f"{secret} missing from .env.example"
        assert "change-me" in env[secret], f".env.example must hold a placeholder for {secret}"


def test_every_compose_variable_is_documented_in_env_example():
    used = set(VAR_REF_RE.findall(COMPOSE.read_text()))
    missing = used - set(_env_example())
    assert not missing, f"variables used by docker-compose.yml but not in .env.example: {missing}"


def test_env_file_is_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert res.returncode == 0, ".env must be git-ignored"
    res = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT)
    assert res.returncode == 1, ".env.example must be committed"


def test_gpu_worker_reserves_nvidia_gpus(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert worker["profiles"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in services["worker-cpu"]


def test_worker_runs_a_process_worker_with_the_stack_env(services):
    for name in ("worker", "worker-cpu"):
        svc = services[name]
        cmd = svc["command"]
        assert cmd[:3] == ["prefect", "worker", "start"]
        assert cmd[cmd.index("--type") + 1] == "process"
        assert cmd[cmd.index("--pool") + 1] == "${PD_WORK_POOL:-gpu-pool}"
        env = _env(svc)
        for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PD_STORAGE", "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY", "FSSPEC_S3_ENDPOINT_URL", "PD_CODE_DIR", "PD_HOME"):
            assert key in env, f"{name} lacks {key}"
        assert (ROOT / svc["build"]["dockerfile"]).is_file()


def test_workers_start_flow_runs_with_the_glibc_malloc_setting(services, deploy_plan):
    """glibc reads GLIBC_TUNABLES at process start: the worker's environment (inherited by its flow runs) and
    the deployments' job variables carry the project's value (pd_core.malloc_env)."""
    from pd_core.malloc_env import MALLOC_TUNABLES

    for name in ("worker", "worker-cpu"):
        assert _env(services[name])["GLIBC_TUNABLES"] == MALLOC_TUNABLES, name
    by_name = {d["name"]: d for d in deploy_plan}
    for name in ("pd-teacher", "pd-distill"):
        assert by_name[name]["job_variables"]["env"]["GLIBC_TUNABLES"] == MALLOC_TUNABLES, name


def test_telemetry_is_off_everywhere(services):
    for name in ("prefect-server", "mlflow", "worker", "worker-cpu"):
        env = _env(services[name])
        assert env.get("DO_NOT_TRACK") == "true", name
        assert env.get("MLFLOW_DISABLE_TELEMETRY") == "true", name
        assert env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false", name


def test_servers_use_postgres_and_s3(services):
    prefect_env = _env(services["prefect-server"])
    assert prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    assert prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    mlflow = services["mlflow"]
    mlflow_env = _env(mlflow)
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    cmd = mlflow["command"]
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://mlflow/"
    assert "--serve-artifacts" in cmd
    hosts = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert {"mlflow", "mlflow:*", "localhost", "localhost:*"} <= set(hosts)


def test_mounted_scripts_exist(services):
    for name, svc in services.items():
        for vol in svc.get("volumes") or []:
            src = str(vol).split(":", 1)[0]
            if src.startswith("./"):
                assert (ROOT / src).is_file(), f"{name} mounts missing {src}"


def test_bucket_job_creates_checkpoints_and_mlflow(services):
    assert _env(services["s3-init"])["S3_BUCKETS"].split() == ["checkpoints", "mlflow"]


# --- deployments/prefect.yaml (registered by deployments/deploy.py) ---------------------------


@pytest.fixture(scope="module")
def deploy_plan() -> list[dict]:
    from deployments import deploy

    args = deploy.parse_args([
        "--gpus", "2", "--preset", "smoke", "--set", "teacher.updates=10",
        "--storage", "s3://checkpoints/pd", "--tracking-uri", "http://mlflow:5000", "--notify-flow",
    ])
    return deploy.plan(deploy.load_spec(SPEC), args)


def test_deploy_plan_declares_the_deployments(deploy_plan):
    by_name = {d["name"]: d for d in deploy_plan}
    assert set(by_name) == {"pd-teacher", "pd-distill", "pd-notify", "pd-sweep"}
    assert by_name["pd-sweep"]["entrypoint"] == "flows/sweep.py:sweep_flow"
    assert by_name["pd-teacher"]["entrypoint"] == "flows/teacher.py:train_teacher_flow"
    assert by_name["pd-distill"]["entrypoint"] == "flows/pipeline.py:distillation_pipeline"
    assert (ROOT / by_name["pd-notify"]["entrypoint"].split(":")[0]).is_file()
    assert by_name["pd-sweep"]["parameters"]["task_tags"] == ["gpu"]  # its points' tasks, held to the GPUs
    for name in ("pd-teacher", "pd-distill"):
        d = by_name[name]
        assert d["work_pool"] == "gpu-pool"
        assert d["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert d["parameters"] == {
            "preset": "smoke", "overrides": ["teacher.updates=10"],
            "storage": "s3://checkpoints/pd", "tracking_uri": "http://mlflow:5000",
            "task_tags": ["gpu"],  # the tag deploy.py limits, whatever the flow's own default
        }
    (schedule,) = by_name["pd-distill"]["schedules"]
    assert schedule["active"] is False  # optional, off until activated


def test_distill_trigger_renders_typed_parameters_from_the_teacher_event(deploy_plan):
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    (trigger,) = next(d for d in deploy_plan if d["name"] == "pd-distill")["triggers"]
    assert trigger["expect"] == ["pd.teacher.completed"]
    payload = {
        "teacher_uri": "s3://checkpoints/pd/pipelines/run-1/teacher",
        "teacher_sha256": "ab" * 32,
        "preset": "smoke",
        "overrides": ["distill.final_steps=2", "eval.num_samples=64"],
        "storage": "s3://checkpoints/pd",
        "tracking_uri": None,
        "mlflow_parent_run_id": "0123456789abcdef0123456789abcdef",
    }

    def render(payload: dict) -> dict:
        event = ReceivedEvent(
            id=uuid.uuid4(), occurred="2026-01-01T00:00:00Z", event="pd.teacher.completed",
            resource={"prefect.resource.id": "pd.pipeline.run-1"}, payload=payload,
        )
        params = copy.deepcopy(trigger["parameters"])
        RunDeployment.validate_parameters(copy.deepcopy(params))  # what the server checks on create
        RunDeployment._upgrade_v1_templates(params)  # what the server does before rendering
        return hydrate(
            params, HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": event})
        )

    assert render(payload) == {
        "teacher_uri": payload["teacher_uri"],
        "preset": "smoke",
        "name": "run-1",
        "overrides": payload["overrides"],
        "storage": "s3://checkpoints/pd",
        "tracking_uri": None,
        # the teacher flow's MLflow parent run: the distillation continues it (one parent per pipeline)
        "mlflow_parent_run_id": "0123456789abcdef0123456789abcdef",
    }
    older = {k: v for k, v in payload.items() if k != "mlflow_parent_run_id"}  # an event from an older teacher flow
    assert render(older)["mlflow_parent_run_id"] is None


def test_deploy_refuses_the_ephemeral_api(monkeypatch, capsys):
    from deployments import deploy

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert deploy.main(["--no-notify"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


def test_notify_trigger_passes_the_round_payload(deploy_plan):
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    (trigger,) = next(d for d in deploy_plan if d["name"] == "pd-notify")["triggers"]
    assert trigger["expect"] == ["pd.round.completed"]
    payload = {"round": 2, "teacher_steps": 8, "student_steps": 4, "checkpoint_uri": "s3://c/r2",
               "metrics": {"fd_fmnist": 12.5, "kid": 0.01}, "trained": True}
    event = ReceivedEvent(
        id=uuid.uuid4(), occurred="2026-01-01T00:00:00Z", event="pd.round.completed",
        resource={"prefect.resource.id": "pd.pipeline.run-1", "prefect.resource.name": "run-1"},
        payload=payload,
    )
    params = copy.deepcopy(trigger["parameters"])
    RunDeployment._upgrade_v1_templates(params)
    rendered = hydrate(
        params, HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": event})
    )
    assert rendered == {"pipeline": "run-1", "payload": payload}

    from deployments.notify import _summary

    line = _summary(rendered["pipeline"], rendered["payload"])
    assert line.startswith("pipeline run-1: round completed (round=2, teacher_steps=8, student_steps=4")
    assert "metrics.fd_fmnist=12.5" in line
