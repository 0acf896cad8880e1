"""The sampler as an MLflow model: logged through the Tracker, loaded back with load_sampler_from_mlflow."""

from __future__ import annotations

import os

# Offline hygiene before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tasks.tracking import MODEL_NAME, Tracker, TrackingError, load_sampler_from_mlflow  # noqa: E402
from tests import test_tracking  # noqa: E402
from tests.test_tracking import _client, _tiny_weights  # noqa: E402

# test_tracking's fixtures, shared: pytest finds fixtures among a module's attributes.
clean_env, migrated_db, db_uri = test_tracking.clean_env, test_tracking.migrated_db, test_tracking.db_uri


def test_sampler_model_round_trip_without_pickle(tmp_path: Path, db_uri: str) -> None:
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-models")
    run = tracker.start_run(run_name="round-03")
    tensors = _tiny_weights(tmp_path / "student.safetensors")
    manifest = {"kind": "student", "round": 3, "steps": 1, "sha256": "cd" * 32}
    uri, version = tracker.log_sampler_model(run, weights_path=str(tmp_path / "student.safetensors"),
                                             manifest=manifest, registered_model="pd-sampler", alias="best",
                                             tags={"pd.round": "3"})
    assert uri.startswith("models:/m-") and version == "1"
    model_uris = (uri, "models:/pd-sampler@best", "models:/pd-sampler/1", f"runs:/{run}/{MODEL_NAME}")
    for index, model_uri in enumerate(model_uris):
        weights, got = load_sampler_from_mlflow(model_uri, tracking_uri=db_uri,
                                                dst_dir=str(tmp_path / "dl" / str(index)))
        assert got == manifest
        loaded = load_file(weights)
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    model_dir = Path(weights).parent.parent
    mlmodel = (model_dir / "MLmodel").read_text()
    assert "mlflow.pyfunc.loaders.code_model" in mlmodel and "python_model.pkl" not in mlmodel
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth")]

    # a later, better student: version 2, alias moved
    _tiny_weights(tmp_path / "student2.safetensors", seed=1)
    _, version2 = tracker.log_sampler_model(run, weights_path=str(tmp_path / "student2.safetensors"),
                                            manifest={**manifest, "round": 4}, registered_model="pd-sampler")
    assert version2 == "2"
    tracker.set_alias(registered_model="pd-sampler", alias="best", version=version2)
    assert str(_client(db_uri).get_model_version_by_alias("pd-sampler", "best").version) == "2"
    assert load_sampler_from_mlflow("models:/pd-sampler@best", tracking_uri=db_uri)[1]["round"] == 4

    with pytest.raises(TrackingError, match="models:/pd-sampler@nope"):
        load_sampler_from_mlflow("models:/pd-sampler@nope", tracking_uri=db_uri)
    # tampered weights in the artifact store are refused
    stored = next((tmp_path / "mlflow" / "mlartifacts").rglob("model.safetensors"))
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    with pytest.raises(TrackingError, match="sha256"):
        for model_uri in ("models:/pd-sampler/1", "models:/pd-sampler/2"):
            load_sampler_from_mlflow(model_uri, tracking_uri=db_uri)


def test_logged_models_are_named_after_pipeline_and_steps_and_old_sampler_names_still_load(tmp_path: Path,
                                                                                             db_uri: str) -> None:
    from tasks.tracking.sampler_model import log_model, sampler_model_name, sha256_file

    assert sampler_model_name(pipeline="sweep.distill-lr-1e-3", steps=4) == "sweep_distill-lr-1e-3-4-step"
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-models")
    named, legacy = tracker.start_run(run_name="round-02"), tracker.start_run(run_name="round-old")
    _tiny_weights(tmp_path / "a.safetensors")
    _tiny_weights(tmp_path / "b.safetensors", seed=1)
    manifest = {"kind": "student", "round": 2, "steps": 2, "sha256": "ab" * 32}
    name = sampler_model_name(pipeline="smoke", steps=2)
    uri, _ = tracker.log_sampler_model(named, weights_path=str(tmp_path / "a.safetensors"), manifest=manifest,
                                       registered_model=None, model_name=name)
    assert _client(db_uri).get_logged_model(uri.removeprefix("models:/")).name == "smoke-2-step"
    # a sampler logged before models had names: called "sampler"
    log_model(_client(db_uri), run_id=legacy, weights_path=str(tmp_path / "b.safetensors"),
              manifest={**manifest, "round": 1}, sha256=sha256_file(tmp_path / "b.safetensors"), tags={})
    uris = ((f"runs:/{named}/smoke-2-step", 2), (f"runs:/{named}/{MODEL_NAME}", 2), (f"runs:/{legacy}/{MODEL_NAME}", 1))
    for index, (model_uri, run_round) in enumerate(uris):
        _, got = load_sampler_from_mlflow(model_uri, tracking_uri=db_uri, dst_dir=str(tmp_path / "dl" / str(index)))
        assert got["round"] == run_round, model_uri
    with pytest.raises(TrackingError, match="smoke-4-step"):  # another name: not this run's sampler
        load_sampler_from_mlflow(f"runs:/{named}/smoke-4-step", tracking_uri=db_uri)


def test_unet_student_logged_and_sampled_from_mlflow(tmp_path: Path, db_uri: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    unet = pytest.importorskip("pd_core.unet")
    import mlflow

    spec = unet.UNetSpec(in_channels=1, out_channels=1, image_size=8, ch=8, emb_ch=16, ch_mult=(1, 2),
                         num_res_blocks=1, attn_resolutions=(), norm_groups=4, dropout=0.0)
    net = unet.UNet(spec)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    manifest = {"kind": "student", "steps": 2, "unet": unet.spec_to_dict(spec), "parameterization": "x",
                "logsnr_min": -20.0, "logsnr_max": 20.0}
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-models")
    run = tracker.start_run(run_name="round-02")
    _, version = tracker.log_sampler_model(run, weights_path=str(tmp_path / "w.safetensors"), manifest=manifest,
                                           registered_model="pd-unet", alias="best")

    weights, got = load_sampler_from_mlflow("models:/pd-unet@best", tracking_uri=db_uri)
    rebuilt = unet.UNet(unet.spec_from_dict(got["unet"]))
    rebuilt.load_state_dict(load_file(weights))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values(), strict=True))

    # the pyfunc (models from code) samples: uint8 (N, H, W, C), deterministic in the seed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db_uri)
    model = mlflow.pyfunc.load_model(f"models:/pd-unet/{version}")
    images = model.predict({"num_images": 2, "steps": 2, "seed": 3})
    assert images.shape == (2, 8, 8, 1) and str(images.dtype) == "uint8"
    again = model.predict(pd.DataFrame([{"num_images": 2, "steps": 2, "seed": 3}]))
    assert (images == again).all()


def test_guided_student_from_mlflow_takes_the_guidance_weight_and_labels(tmp_path: Path, db_uri: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The registered model of a guided-distilled student samples class ``label`` (or per-image ``labels``) at
    guidance weight ``guidance``: exactly what pd_core's DDIM of the w-conditioned net gives for the same seed."""
    import mlflow

    from pd_core.denoiser import Denoiser
    from pd_core.guidance import guided
    from pd_core.samplers import ddim
    from pd_core.unet import UNet, UNetSpec, spec_to_dict

    spec = UNetSpec(in_channels=1, out_channels=1, image_size=8, ch=8, emb_ch=16, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(), norm_groups=4, dropout=0.0, num_classes=3, null_class=True,
                    guidance_embedding=True)
    torch.manual_seed(0)
    net = UNet(spec).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    manifest = {"kind": "student", "steps": 2, "unet": spec_to_dict(spec), "parameterization": "x",
                "logsnr_min": -20.0, "logsnr_max": 20.0}
    tracker = Tracker(tracking_uri=db_uri, experiment="pd-models")
    run = tracker.start_run(run_name="round-guided")
    _, version = tracker.log_sampler_model(run, weights_path=str(tmp_path / "w.safetensors"), manifest=manifest,
                                           registered_model="pd-guided", alias="final")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db_uri)
    model = mlflow.pyfunc.load_model(f"models:/pd-guided/{version}")

    def direct(labels: list[int], w: float) -> torch.Tensor:
        z = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(5))
        fn = guided(Denoiser(net, parameterization="x"), arch=spec, y=torch.tensor(labels), w=w)
        x = ddim(fn, z, num_steps=2)
        return torch.floor((x + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    one_class = model.predict({"num_images": 3, "steps": 2, "seed": 5, "label": 1, "guidance": 2.0})
    assert (torch.from_numpy(one_class) == direct([1, 1, 1], 2.0)).all()
    framed = model.predict(pd.DataFrame([{"num_images": 3, "steps": 2, "seed": 5, "label": 1, "guidance": 2.0}]))
    assert (framed == one_class).all()
    per_image = model.predict({"num_images": 3, "steps": 2, "seed": 5, "guidance": 0.5}, params={"labels": [2, 0, 1]})
    assert (torch.from_numpy(per_image) == direct([2, 0, 1], 0.5)).all()
    balanced = model.predict({"num_images": 3, "steps": 2, "seed": 5})  # class i mod K, w = 0
    assert (torch.from_numpy(balanced) == direct([0, 1, 2], 0.0)).all()
    assert not (one_class == model.predict({"num_images": 3, "steps": 2, "seed": 5, "label": 1})).all()
    with pytest.raises(Exception, match=r"labels must lie in \[0, 2\]"):
        model.predict({"num_images": 1, "steps": 1, "label": 3})
