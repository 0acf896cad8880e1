"""Importing a diffusers UNet2DModel as a teacher: our DDIM over it is diffusers' DDIM, Algorithm 2 holds on it,
and bad folders are refused with one line.

Every model here is a tiny randomly initialised UNet2DModel saved with save_pretrained (tests/diffusers_models.py)
and imported through the real path: ``jobs.import_diffusers_teacher`` into a checkpoint store, then
``models.load_model`` from the store, exactly as a pipeline round and ``pd sample`` see it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pd_core import distill, jobs, samplers, schedule
from pd_core.config import ConfigError, load_config
from pd_core.interop.diffusers_folder import DiffusersImportError, preflight
from pd_core.models import load_model
from pd_core.store import CheckpointStore
from tests.diffusers_models import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    ddim_scheduler,
    diffusers,
    diffusers_ddim,
    save_teacher,
)

KIND = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}
REPO = Path(__file__).resolve().parents[1]


def teacher_cfg(folder: Path, store: Path, *overrides: str):
    return load_config(preset="smoke", overrides=[f"pipeline.teacher_uri=diffusers:{folder}",
                                                  f"storage.root={store}", *overrides])


@functools.cache
def imported(prediction_type: str, beta_schedule: str, layout: str = "pipeline", classes: int | None = None):
    """(diffusers UNet2DModel, our LoadedModel) of one saved tiny teacher, imported through a store (cached)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="pd-diffusers-import-"))
    folder = save_teacher(root / "teacher", prediction_type=prediction_type, beta_schedule=beta_schedule,
                          layout=layout, num_class_embeds=classes)
    cfg = teacher_cfg(folder, root / "store")
    store = CheckpointStore(cfg.storage.root)
    info = jobs.import_diffusers_teacher(cfg, store, uri=cfg.pipeline.teacher_uri)
    loaded = load_model(store, info.key)
    loaded.denoiser.net.double()
    unet_dir = folder / "unet" if layout == "pipeline" else folder
    reference = diffusers.UNet2DModel.from_pretrained(str(unet_dir)).double().eval()
    return reference, loaded, folder, store, info


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 8, 50])
def test_our_ddim_over_an_imported_unet2dmodel_equals_diffusers_ddim(steps, beta_schedule, prediction_type):
    reference, loaded, *_ = imported(prediction_type, beta_schedule)
    assert loaded.denoiser.parameterization == KIND[prediction_type]
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    ours = samplers.ddim(loaded.denoiser, z, num_steps=steps, clip=False, schedule=loaded.schedule)
    ref = diffusers_ddim(reference, z, steps=steps, prediction_type=prediction_type, beta_schedule=beta_schedule)
    assert ours.shape == ref.shape == z.shape
    assert float((ref - z).abs().max()) > 1e-2  # the reference moved: the comparison is not vacuous
    # 1e-4; relative too where an eps teacher's unclipped x_hat at alpha_bar ~ 2e-9 (squaredcos) reaches 1e4 and
    # diffusers takes sqrt(alpha_bar) in float32 (6e-8 relative)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-4)


def test_a_class_conditional_unet2dmodel_samples_like_diffusers_with_the_same_labels():
    reference, loaded, *_ = imported("epsilon", "linear", "model", 3)
    assert loaded.num_classes == 3 and loaded.image_shape == (1, 8, 8)
    y = torch.tensor([0, 1, 2, 1])
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = samplers.ddim(loaded.denoiser.with_labels(y), z, num_steps=8, clip=False, schedule=loaded.schedule)
    ref = diffusers_ddim(reference, z, steps=8, prediction_type="epsilon", beta_schedule="linear", class_labels=y)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-4)
    other = samplers.ddim(loaded.denoiser.with_labels(torch.tensor([2, 0, 1, 0])), z, num_steps=8, clip=False,
                          schedule=loaded.schedule)
    assert float((other - ours).abs().max()) > 1e-3  # the labels reach the network


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("n", [1, 2, 4])
@torch.no_grad()
def test_one_student_step_on_x_tilde_lands_on_two_teacher_steps_of_an_imported_teacher(n, prediction_type):
    _, loaded, *_ = imported(prediction_type, "linear")
    teacher, sched = loaded.denoiser, loaded.schedule
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = (torch.arange(n, dtype=torch.float64) + 1) / n  # every student time
    x_tilde = distill.distillation_target(teacher, z=z, t=t, num_steps=n, schedule=sched)
    b = lambda v: v[:, None, None, None]  # noqa: E731
    alpha_sigma = lambda s: tuple(b(v) for v in schedule.alpha_sigma(sched.logsnr(s)))  # noqa: E731
    x1, e1 = teacher(z, sched.logsnr(t))
    a_mid, s_mid = alpha_sigma(t - 0.5 / n)
    x2, e2 = teacher(a_mid * x1 + s_mid * e1, sched.logsnr(t - 0.5 / n))
    a_s, s_s = alpha_sigma(t - 1.0 / n)
    z_two = a_s * x2 + s_s * e2  # the teacher's two-step point
    a_t, s_t = alpha_sigma(t)
    z_one = a_s * x_tilde + s_s * (z - a_t * x_tilde) / s_t  # one student DDIM step with x_hat = x_tilde
    last = t == 1.0 / n  # the student's last step returns x_hat: its target is the teacher's x_hat at t'
    assert z_one.dtype == torch.float64
    np.testing.assert_allclose(z_one[~last].numpy(), z_two[~last].numpy(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(x_tilde[last].numpy(), x2[last].numpy(), rtol=0, atol=1e-12)


def test_the_imported_checkpoint_records_what_rebuilds_the_model_and_no_pickle():
    _, loaded, folder, store, info = imported("v_prediction", "scaled_linear")
    manifest = store.read_manifest(info.key)
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert manifest["unet"] is None
    assert manifest["diffusers_unet2d"] == {k: v for k, v in config.items() if not k.startswith("_")}
    assert manifest["diffusers_scheduler"]["prediction_type"] == "v_prediction"
    assert manifest["parameterization"] == "v" and manifest["num_train_timesteps"] == 1000
    # the schedule is diffusers' own float32 table, not a re-derivation
    table = ddim_scheduler(beta_schedule="scaled_linear").alphas_cumprod
    assert manifest["schedule"]["kind"] == "discrete"
    assert torch.equal(torch.tensor(manifest["schedule"]["alphas_cumprod"], dtype=torch.float32), table)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert manifest["parent_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["imported_from"] == f"diffusers:{folder}"
    files = [p.name for p in Path(store.uri(info.key).removeprefix("file://")).iterdir()]
    assert all(f.endswith((".safetensors", ".json")) for f in files), files


def test_a_diffusers_folder_behind_an_fsspec_url_imports_like_a_local_one(tmp_path):
    import fsspec

    folder = save_teacher(tmp_path / "teacher", layout="model")
    fs = fsspec.filesystem("memory")
    for path in folder.iterdir():
        fs.pipe_file(f"/pd-tests-teacher/{path.name}", path.read_bytes())
    cfg = load_config(preset="smoke", overrides=["pipeline.teacher_uri=diffusers:memory://pd-tests-teacher",
                                                  f"storage.root={tmp_path / 'store'}"])
    store = CheckpointStore(cfg.storage.root)
    info = jobs.ensure_teacher(cfg, store)
    from safetensors.torch import load_file

    tensors, manifest = store.load_checkpoint(info.key)
    want = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert tensors.keys() == {f"unet.{k}" for k in want}
    assert all(torch.equal(tensors[f"unet.{k}"], v) for k, v in want.items())
    assert manifest["imported_from"] == "diffusers:memory://pd-tests-teacher"
    loaded = load_model(store, info.key)
    assert bool(torch.isfinite(samplers.ddim(loaded.denoiser, torch.randn(2, 1, 8, 8), num_steps=2,
                                             schedule=loaded.schedule)).all())
    assert preflight(cfg).num_train_timesteps == 1000


def _armed_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))
    return pickle.dumps(Payload())


def test_the_armed_pickle_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "control"
    pickle.loads(_armed_pickle(marker))  # noqa: S301 - the control: it must run the payload
    assert marker.exists()


def _to_bin(folder: Path, marker: Path) -> None:
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.with_name("diffusion_pytorch_model.bin").write_bytes(_armed_pickle(marker))


def _edit_json(path: str, **changes):
    def edit(folder: Path, _marker: Path) -> None:
        doc = json.loads((folder / path).read_text())
        doc.update(changes)
        (folder / path).write_text(json.dumps(doc))
    return edit


def _delete(path: str):
    return lambda folder, _marker: (folder / path).unlink()


def _write(path: str, data: bytes):
    return lambda folder, _marker: (folder / path).write_bytes(data)


def _wrong_weights(folder: Path, _marker: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors["conv_in.weight"] = torch.zeros(9, 1, 3, 3)
    save_file(tensors, str(path))


BROKEN = {
    "pickle-bin": (_to_bin, "is a pickle, which can run code when loaded and is never opened"),
    "no-weights": (_delete("unet/diffusion_pytorch_model.safetensors"), "diffusion_pytorch_model.safetensors does not"),
    "sharded": (lambda f, m: (_delete("unet/diffusion_pytorch_model.safetensors")(f, m),
                              _write("unet/diffusion_pytorch_model.safetensors.index.json", b"{}")(f, m)),
                "holds sharded weights"),
    "no-scheduler": (_delete("scheduler/scheduler_config.json"), "has no scheduler_config.json"),
    "no-config": (_delete("unet/config.json"), "holds neither unet/config.json"),
    "not-json": (_write("unet/config.json", b"{not json"), "is not valid JSON"),
    "huge-json": (_write("unet/config.json", b" " * (2 << 20)), "more than the 1048576 allowed"),
    "conditional-unet": (_edit_json("unet/config.json", _class_name="UNet2DConditionModel"),
                         "only UNet2DModel"),
    "fourier": (_edit_json("unet/config.json", time_embedding_type="fourier"), "time_embedding_type 'fourier'"),
    "prediction": (_edit_json("scheduler/scheduler_config.json", prediction_type="flow"),
                   "prediction_type 'flow' is not one of"),
    "zero-snr": (_edit_json("scheduler/scheduler_config.json", rescale_betas_zero_snr=True),
                 "rescale_betas_zero_snr"),
    "beta-schedule": (_edit_json("scheduler/scheduler_config.json", beta_schedule="exotic"),
                      "diffusers cannot build this scheduler"),
    "misfit": (_wrong_weights, "the weights do not fit the UNet2DModel config (conv_in.weight has shape"),
    "few-timesteps": (_edit_json("scheduler/scheduler_config.json", num_train_timesteps=4),
                      "trained on 4 timesteps, fewer than the 8 sampling steps"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_diffusers_folder_is_refused_with_one_line_and_nothing_is_written(tmp_path, case):
    breaks, message = BROKEN[case]
    folder = save_teacher(tmp_path / "teacher")
    marker = tmp_path / "pwned"
    breaks(folder, marker)
    cfg = teacher_cfg(folder, tmp_path / "store")
    store = CheckpointStore(cfg.storage.root)
    with pytest.raises(DiffusersImportError) as err:
        jobs.ensure_teacher(cfg, store)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert str(folder) in text  # names the file or folder
    assert not store.is_complete(jobs.teacher_key(cfg.pipeline.name))
    assert not marker.exists()  # the pickle never ran
    if case not in ("misfit", "beta-schedule", "few-timesteps"):  # what only the weights or diffusers can tell
        with pytest.raises(ConfigError, match="pipeline.teacher_uri"):
            preflight(cfg)


def test_preflight_refuses_a_grid_finer_than_the_timesteps_and_the_wrong_image_size(tmp_path):
    folder = save_teacher(tmp_path / "teacher", num_train_timesteps=6)
    with pytest.raises(ConfigError, match=r"set distill.start_steps to at most 6 .* e\.g\. 4"):
        preflight(teacher_cfg(folder, tmp_path / "store"))
    assert preflight(teacher_cfg(folder, tmp_path / "store", "distill.start_steps=4")).num_train_timesteps == 6
    with pytest.raises(ConfigError, match="data.image_size must be the imported model's sample_size 8, got 16"):
        preflight(teacher_cfg(folder, tmp_path / "store", "distill.start_steps=4", "data.image_size=16"))


def test_a_diffusers_uri_needs_a_folder_and_no_password(tmp_path):
    with pytest.raises(ConfigError, match="must name a folder after 'diffusers:'"):
        load_config(preset="smoke", overrides=["pipeline.teacher_uri='diffusers:'"])
    with pytest.raises(ConfigError, match="must not contain credentials"):
        load_config(preset="smoke", overrides=["pipeline.teacher_uri=diffusers:s3://me:pw@host/bucket/model"])


def test_pd_core_imports_and_refuses_clearly_without_diffusers(tmp_path):
    _, _, _, store, info = imported("epsilon", "linear")
    code = f"""
import sys
sys.modules["diffusers"] = None  # as if it were not installed
import pd_core.jobs, pd_core.models, pd_core.evaluation, pd_core.architecture, pd_core.interop.diffusers
import pd_core.interop.diffusers_folder, flows.sampling
from pd_core.models import load_model_uri
assert "torch" in sys.modules
try:
    load_model_uri({store.uri(info.key)!r})
except ImportError as err:
    print(err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs the optional diffusers package" in out.stdout and "pip install -e '.[diffusers]'" in out.stdout
