"""Whole ``pd run`` on moto S3 (subprocesses, embedded Prefect and MLflow).

- a second ``pd run`` with the same name is refused while the first holds the lease;
- the test credentials appear nowhere in MLflow, Prefect's DB/logs, the store or the output.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest

from tests.faults.helpers import FAKE_KEY_ID, FAKE_SECRET, _boto, _free_port, _start_moto
from tests.faults.pd_runs import PIPELINE_FAST, _pd, _pd_env, _Proc, _set_args, _wait_for


@dataclass
class S3Run:
    first: _Proc
    second: _Proc
    bucket: str
    endpoint: str
    lease_doc: dict
    keys_before_second: list[str]
    keys_after_second: list[str]


@pytest.fixture(scope="module")
def s3_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Run]:
    """`pd run` on moto S3 with fake credentials; frozen after taking its lease while a second `pd run` tries."""
    tmp = tmp_path_factory.mktemp("s3-pipeline")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = _start_moto(port)
    try:
        s3 = _boto(endpoint)
        bucket = f"pd-sec-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        aws = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-creds")}
        args = ["run", "--preset", "smoke", "--name", "sec", "--storage", f"s3://{bucket}/store",
                *_set_args([f"storage.storage_options={{client_kwargs: {{endpoint_url: '{endpoint}'}}}}",
                            "tracking.registered_model=pd-faults-sec", *PIPELINE_FAST])]
        lease_key = "store/pipelines/sec/lease/lease.json"

        def keys() -> list[str]:
            return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))

        first = _pd(tmp / "home-a", args, _pd_env(tmp / "home-a", **aws))
        _wait_for(lambda: lease_key in keys(), first, timeout=180, what="lease")
        os.kill(first.proc.pid, signal.SIGSTOP)  # alive and holding the lease, doing nothing
        try:
            lease_doc = json.loads(s3.get_object(Bucket=bucket, Key=lease_key)["Body"].read())
            before = keys()
            second = _pd(tmp / "home-b", args, _pd_env(tmp / "home-b", **aws))
            second.wait(timeout=180)
            after = keys()
        finally:
            os.kill(first.proc.pid, signal.SIGCONT)
        first.wait(timeout=300)
        yield S3Run(first=first, second=second, bucket=bucket, endpoint=endpoint, lease_doc=lease_doc,
                    keys_before_second=before, keys_after_second=after)
    finally:
        server.stop()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_second_pipeline_run_with_the_same_name_is_refused(s3_pipeline: S3Run) -> None:
    run = s3_pipeline
    assert run.second.rc == 1, run.second.err()[-3000:]
    error_lines = [line for line in run.second.err().splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, run.second.err()[-3000:]
    owner = run.lease_doc["owner"]
    assert owner.split(":")[1] == str(run.first.proc.pid) and run.lease_doc["pid"] == run.first.proc.pid
    assert f"is leased by {owner!r}" in error_lines[0] and str(run.first.proc.pid) in error_lines[0], error_lines[0]
    assert "another run with this name is active" in error_lines[0]
    assert run.keys_after_second == run.keys_before_second, "the refused run wrote to the store"
    # ... and the first run, unfrozen, finished normally and released its lease
    assert run.first.rc == 0, run.first.err()[-3000:]
    assert "pipeline sec finished" in run.first.out()
    assert not any(k.endswith("lease/lease.json") for k in _list_keys(run))


@pytest.mark.integration
def test_refused_run_prints_no_traceback(s3_pipeline: S3Run) -> None:
    """A run-time failure inside the flow: Prefect's console logs keep the message, not the traceback."""
    err = s3_pipeline.second.err()
    assert "Traceback" not in err and 'File "' not in err, err[-2000:]


def _list_keys(run: S3Run) -> list[str]:
    s3 = _boto(run.endpoint)
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=run.bucket).get("Contents", []))


def _secret_forms() -> list[bytes]:
    forms = set()
    for secret in (FAKE_KEY_ID, FAKE_SECRET):
        forms |= {secret, quote(secret, safe=""), quote(secret, safe="/"), json.dumps(secret)[1:-1]}
    return sorted(f.encode() for f in forms)


def _scan(blobs: dict[str, bytes]) -> list[str]:
    return [f"{name}: {form.decode()}" for name, data in blobs.items() for form in _secret_forms() if form in data]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_credentials_never_reach_mlflow_prefect_logs_store_or_output(s3_pipeline: S3Run) -> None:
    run = s3_pipeline
    assert run.first.rc == 0, run.first.err()[-3000:]
    blobs: dict[str, bytes] = {}
    for home in (run.first.home, run.second.home):
        for path in home.rglob("*"):
            if path.is_file():
                blobs[str(path)] = path.read_bytes()
    for proc in (run.first, run.second):
        blobs[str(proc.stdout)] = proc.stdout.read_bytes()
        blobs[str(proc.stderr)] = proc.stderr.read_bytes()
    s3 = _boto(run.endpoint)
    for key in _list_keys(run):
        blobs[f"s3://{run.bucket}/{key}"] = s3.get_object(Bucket=run.bucket, Key=key)["Body"].read()

    # The scan looks at the real stores: Prefect's DB holds the run's logs, MLflow's the params, artifacts exist.
    home = run.first.home
    prefect_db = b"".join(blobs.get(str(home / "prefect" / f"prefect.db{s}"), b"") for s in ("", "-wal"))
    assert b"teacher saved to s3://" in prefect_db, "Prefect's DB does not hold the run's logs: wrong place scanned"
    mlflow_db = blobs[str(home / "mlflow.db")]
    assert f"s3://{run.bucket}/store".encode() in mlflow_db
    artifacts = [p for p in (home / "mlartifacts").rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in artifacts) and any(p.suffix == ".safetensors" for p in artifacts)
    assert any(k.endswith("manifest.json") for k in blobs if k.startswith("s3://"))
    assert _scan({"control": f"x {quote(FAKE_SECRET, safe='')} y".encode()}), "the scanner itself is broken"

    leaks = _scan(blobs)
    assert not leaks, f"credentials found: {leaks}"
