"""The sampler as an MLflow model: logged as a "models from code" pyfunc, loaded back as plain files.

A logged model is named after its pipeline and step count (:func:`sampler_model_name`, ``smoke-4-step``), so
MLflow's model lists tell them apart; ``runs:/<run_id>/<name>`` resolves to it, and ``runs:/<run_id>/sampler``
to the run's sampler whatever its name (samplers logged before they had names were all called ``sampler``).
The model is ``mlflow_model.py`` (next to this file; MLflow copies it into the model) with the weights
as a safetensors artifact and the manifest as JSON: no pickle anywhere. :func:`load_sampler_from_mlflow`
gives pd_core a weights file and a manifest to load without executing any logged code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from tasks.tracking.errors import TrackingError, one_line
from tasks.tracking.redact import redact
from tasks.tracking.uris import normalise_uri

if TYPE_CHECKING:
    import pandas

log = logging.getLogger("tasks.tracking")  # the package's one logger: callers filter records on this name

MODEL_NAME = "sampler"  # runs:/<run_id>/sampler: the run's sampler, whatever its name (the name of older ones)
_NAME_UNSAFE = re.compile(r"[/:.%\"']")  # characters MLflow refuses in a logged model's name
MAX_MODEL_DOC_BYTES = 1 << 20  # an MLmodel file or a manifest is a few KB
MODEL_CODE_PATH = Path(__file__).with_name("mlflow_model.py")  # the models-from-code file
_PIP_REQUIREMENTS = ("torch", "safetensors", "numpy")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sampler_model_name(*, pipeline: str, steps: int) -> str:
    """The logged model's name: ``<pipeline>-<N>-step`` (characters MLflow refuses in the name become '_')."""
    return f"{_NAME_UNSAFE.sub('_', pipeline)}-{steps}-step"


def _extra_requirements(manifest: dict) -> list[str]:
    """What the model's environment needs beyond torch: diffusers for a diffusers UNet2DModel student."""
    if manifest.get("diffusers_unet2d") is None:
        return []
    import diffusers

    return [f"diffusers=={diffusers.__version__}"]


def _sampler_signature() -> ModelSignature:
    """predict() input: optional num_images, steps, seed, label (long) and guidance (double); params clip and
    labels (one class per image); output uint8 (N, H, W, C) images."""
    import numpy as np

    inputs = Schema([ColSpec("long", name, required=False) for name in ("num_images", "steps", "seed", "label")]
                    + [ColSpec("double", "guidance", required=False)])
    outputs = Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, -1))])
    params = ParamSchema([ParamSpec("clip", "boolean", True), ParamSpec("labels", "long", [], shape=(-1,))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _sampler_example(manifest: dict) -> pandas.DataFrame:
    """One request row (checked against the signature only; the sampler is not run at save time)."""
    import pandas as pd

    steps = manifest.get("steps")
    return pd.DataFrame([{"num_images": 4, "steps": int(steps) if isinstance(steps, int) else 1, "seed": 0}])


def _write_model_dir(tmp: Path, *, weights_path: str, manifest: dict, sha256: str, mlflow_model: Model) -> Path:
    """Save the models-from-code pyfunc under ``tmp/model``: code file + safetensors + manifest.json."""
    weights = tmp / "model.safetensors"
    shutil.copyfile(weights_path, weights)  # the artifact's file name inside the model
    manifest_file = tmp / "manifest.json"
    manifest_file.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    local = tmp / "model"
    # python_model is a FILE PATH (models from code): MLflow copies the file, nothing is pickled.
    mlflow.pyfunc.save_model(
        path=str(local), python_model=str(MODEL_CODE_PATH),
        artifacts={"weights": str(weights), "manifest": str(manifest_file)},
        pip_requirements=[f"mlflow=={mlflow.__version__}", *_PIP_REQUIREMENTS, *_extra_requirements(manifest)],
        metadata={"weights_sha256": sha256, "weights_format": "safetensors"},
        signature=_sampler_signature(), input_example=_sampler_example(manifest), mlflow_model=mlflow_model)
    return local


def log_model(client: MlflowClient, *, run_id: str, weights_path: str, manifest: dict, sha256: str,
              tags: dict[str, str], name: str = MODEL_NAME) -> str:
    """Log the sampler as a logged model of ``run_id`` (an output of the run) named ``name``; its model id.

    The logged model is READY once its artifacts are uploaded; on any failure it is marked FAILED
    (best effort) and the error is raised.
    """
    experiment_id = client.get_run(run_id).info.experiment_id
    model = client.create_logged_model(experiment_id=experiment_id, name=name, source_run_id=run_id,
                                       tags=tags, model_type="diffusion-sampler")
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="pd-mlflow-model-") as tmp:
            local = _write_model_dir(Path(tmp), weights_path=weights_path, manifest=manifest,
                                     sha256=sha256, mlflow_model=Model(
                                         artifact_path=model.artifact_location, model_uuid=model.model_id,
                                         run_id=run_id, model_id=model.model_id))
            client.log_model_artifacts(model.model_id, str(local))
        client.finalize_logged_model(model.model_id, "READY")
    except Exception:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model.model_id, "FAILED")
        raise
    return model.model_id


def _model_location(client: MlflowClient, model_uri: str) -> str:
    """The artifact location behind a models:/ or runs:/ URI, through ``client`` only.

    MLflow's own models:/ resolution (ModelsArtifactRepository) reads the GLOBAL tracking/registry
    URI, whatever URI the caller passes; this resolves the same URIs with an explicit client.
    """
    scheme = urlsplit(model_uri).scheme
    if scheme == "models":
        path = model_uri[len("models:"):].strip("/")
        if "@" in path:  # models:/name@alias
            name, alias = path.rsplit("@", 1)
            return client.get_model_version_download_uri(name, client.get_model_version_by_alias(name, alias).version)
        if "/" in path:  # models:/name/version
            name, version = path.rsplit("/", 1)
            if version == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise TrackingError(f"registered model {name!r} has no versions")
                version = str(max(int(v.version) for v in versions))
            return client.get_model_version_download_uri(name, version)
        return client.get_logged_model(path).artifact_location  # models:/<model_id>
    if scheme == "runs":  # runs:/<run_id>/<logged model name>
        run_id, _, name = model_uri[len("runs:"):].strip("/").partition("/")
        name = name or MODEL_NAME
        run = client.get_run(run_id)
        matches = _run_models(client, run, name=name)
        if not matches and name == MODEL_NAME:  # runs:/<run>/sampler: the run's sampler, whatever its name
            matches = _run_models(client, run, name=None)
        if matches:
            return max(matches, key=lambda m: m.creation_timestamp).artifact_location
        return f"{run.info.artifact_uri.rstrip('/')}/{name}"  # a model logged as plain run artifacts
    return model_uri  # already an artifact location (file://, s3://, mlflow-artifacts:/...)


def _run_models(client: MlflowClient, run, *, name: str | None) -> list:
    """The logged models ``run`` produced (named ``name``; any name for None), every page read."""
    where = f"source_run_id = '{run.info.run_id}'" + ("" if name is None else f" AND name = '{name}'")
    token: str | None = None
    found = []
    while True:
        page = client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=where,
                                           page_token=token)
        found += [m for m in page if m.source_run_id == run.info.run_id]
        token = page.token
        if not token:
            return found


def load_sampler_from_mlflow(model_uri: str, *, dst_dir: str | None = None,
                             tracking_uri: str | None = None) -> tuple[str, dict]:
    """Download a logged sampler (``models:/name@alias``, ``models:/<id>``, ``runs:/<run>/<name or sampler>``).

    Returns ``(weights_path, manifest)``: a local safetensors file and the manifest dict, so pd_core
    loads the model without executing logged code or unpickling anything. The weights' sha256 is
    checked against the one recorded at logging time. ``tracking_uri`` defaults to MLflow's own
    resolution (MLFLOW_TRACKING_URI). Raises :class:`TrackingError` with a one-line message. The files
    land in ``dst_dir`` (the caller removes it), else in a new temp folder the caller owns on success
    (removed on failure). The MLmodel's artifact paths must stay inside the downloaded model.
    """
    uri = normalise_uri(tracking_uri or mlflow.get_tracking_uri())
    dst = dst_dir or tempfile.mkdtemp(prefix="pd-mlflow-model-")
    try:
        return _download_sampler(model_uri, uri=uri, dst=dst)
    except BaseException:
        if dst_dir is None:  # the caller never sees the folder: nothing may stay behind
            shutil.rmtree(dst, ignore_errors=True)
        raise


def _inside(local: Path, relative: Any, *, model_uri: str, what: str) -> Path:
    """``local / relative`` when it is a relative path that stays inside ``local`` (links resolved)."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute():
        raise TrackingError(f"{model_uri}: the MLmodel's {what} path {relative!r} is not a relative path inside the "
                            f"model; refusing it")
    path = (local / relative).resolve()
    if not path.is_relative_to(local.resolve()) or not path.is_file():
        raise TrackingError(f"{model_uri}: the MLmodel's {what} path {relative!r} is not a file inside the model; "
                            f"refusing it")
    return path


def _download_sampler(model_uri: str, *, uri: str, dst: str) -> tuple[str, dict]:
    import yaml

    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        location = _model_location(client, model_uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=dst, tracking_uri=uri))
    except Exception as err:  # noqa: BLE001 - one clear line for the CLI
        raise TrackingError(f"cannot download MLflow model {model_uri} from {redact(uri)}: {one_line(err)}") from err
    mlmodel_path = local / "MLmodel"
    if not mlmodel_path.is_file() or mlmodel_path.stat().st_size > MAX_MODEL_DOC_BYTES:
        raise TrackingError(f"{model_uri} is not an MLflow model (no MLmodel file of at most "
                            f"{MAX_MODEL_DOC_BYTES} bytes in {local})")
    try:
        mlmodel = yaml.safe_load(mlmodel_path.read_text(encoding="utf-8")) or {}
        artifacts = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
        weights_rel, manifest_rel = artifacts["weights"]["path"], artifacts["manifest"]["path"]
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise TrackingError(f"{model_uri} is not a pd sampler model (no weights/manifest artifacts)") from err
    weights = _inside(local, weights_rel, model_uri=model_uri, what="weights")
    manifest_file = _inside(local, manifest_rel, model_uri=model_uri, what="manifest")
    expected = (mlmodel.get("metadata") or {}).get("weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise TrackingError(f"{model_uri}: weights sha256 does not match the one logged ({expected[:12]}...)")
    if manifest_file.stat().st_size > MAX_MODEL_DOC_BYTES:
        raise TrackingError(f"{model_uri}: its manifest is larger than {MAX_MODEL_DOC_BYTES} bytes; refusing it")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise TrackingError(f"{model_uri}: its manifest is not JSON ({one_line(err)})") from None
    if not isinstance(manifest, dict):
        raise TrackingError(f"{model_uri}: its manifest is not a JSON object")
    log.info("MLflow model %s downloaded to %s", model_uri, local)
    return str(weights), manifest
