"""Imported scheduler configs copied from published checkpoints: accepted or refused by class, every unused
setting named, and the ``diffusers_ddim`` baseline equal to ``DDIMPipeline.from_pretrained(folder)`` defaults.

Tiny random UNet2DModels saved locally (tests/diffusers_models.py) with each real checkpoint's scheduler config.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

import pytest
import torch

from pd_core import jobs
from pd_core.interop.diffusers_ddim import folder_ddim
from pd_core.interop.diffusers_folder import DiffusersImportError, read_configs
from pd_core.models import load_model
from pd_core.store import CheckpointStore
from tests.diffusers_models import diffusers, save_teacher, tiny_unet
from tests.test_diffusers_import import teacher_cfg

# scheduler configs as published (private keys aside), one per kind of checkpoint the import must handle
REAL_CONFIGS = {
    "ddpm_cifar10_linear_clip": {"_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02,
                                 "beta_schedule": "linear", "clip_sample": True, "num_train_timesteps": 1000,
                                 "trained_betas": None, "variance_type": "fixed_small"},
    "v_scaled_linear_offset_leading": {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                                       "beta_schedule": "scaled_linear", "clip_sample": False,
                                       "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                                       "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                                       "timestep_spacing": "leading", "trained_betas": None},
    "squaredcos_class_conditional": {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2",
                                     "clip_sample": True, "num_train_timesteps": 1000,
                                     "prediction_type": "epsilon", "variance_type": "learned_range"},
    "squaredcos_T4000": {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "clip_sample": True,
                         "num_train_timesteps": 4000, "prediction_type": "epsilon"},
    "linear_T100_ddim": {"_class_name": "DDIMScheduler", "beta_start": 0.001, "beta_end": 0.2,
                         "beta_schedule": "linear", "clip_sample": True, "clip_sample_range": 1.0,
                         "num_train_timesteps": 100, "set_alpha_to_one": True, "steps_offset": 0,
                         "timestep_spacing": "leading"},
}


def save_with_scheduler(folder: Path, config: dict, *, seed: int = 0) -> Path:
    """A pipeline folder: a tiny UNet2DModel and ``config`` saved by its own scheduler class."""
    cls = getattr(diffusers, config["_class_name"])
    scheduler = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    diffusers.DDPMPipeline(unet=tiny_unet(seed=seed), scheduler=scheduler).save_pretrained(str(folder))
    return folder


@functools.cache
def imported(name: str):
    """(folder, our LoadedModel) of a tiny model with the real config ``name``, imported through a store."""
    root = Path(tempfile.mkdtemp(prefix="pd-sched-"))
    folder = save_with_scheduler(root / "teacher", REAL_CONFIGS[name])
    cfg = teacher_cfg(folder, root / "store")
    store = CheckpointStore(cfg.storage.root)
    info = jobs.import_diffusers_teacher(cfg, store, uri=cfg.pipeline.teacher_uri)
    return folder, load_model(store, info.key)


@functools.cache
def stock_pipeline(name: str):
    """``DDIMPipeline.from_pretrained(folder)`` of :func:`imported`'s folder (cached)."""
    pipe = diffusers.DDIMPipeline.from_pretrained(str(imported(name)[0]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
@pytest.mark.parametrize("steps", [1, 16])
def test_the_diffusers_ddim_baseline_is_what_the_stock_ddim_pipeline_does_with_its_defaults(name, steps):
    folder, loaded = imported(name)
    stock = stock_pipeline(name)(batch_size=2, generator=torch.Generator().manual_seed(steps),
                                 num_inference_steps=steps, output_type="pt").images  # (B, C, H, W) in [0, 1]
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(steps))  # the pipeline's own draw
    ours = folder_ddim(loaded.denoiser.net.unet, loaded.architecture.scheduler_config, noise, steps=steps)
    ours = (ours / 2 + 0.5).clamp(0, 1)
    assert float(stock.std()) > 1e-2  # an image, not a constant
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["FlowMatchEulerDiscreteScheduler", "ScoreSdeVeScheduler", "EDMEulerScheduler",
                                  "LCMScheduler"])
def test_a_scheduler_of_another_model_kind_is_refused_in_one_line_naming_it(tmp_path, name):
    folder = save_teacher(tmp_path / "teacher")
    path = folder / "scheduler" / "scheduler_config.json"
    import json

    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": name}))
    with pytest.raises(DiffusersImportError) as err:
        read_configs(f"diffusers:{folder}")
    message = str(err.value)
    assert "\n" not in message and name in message and "scheduler_config.json" in message


def test_each_unused_scheduler_setting_is_named_at_import_saying_why(caplog):
    with caplog.at_level(logging.WARNING, logger="pd_core.interop.diffusers"):
        imported.cache_clear()
        imported("v_scaled_linear_offset_leading")
    # One LogRecord per emission: a record that reaches the capture twice (a handler left on a pd_core logger by
    # an earlier test in the same session) is one warning, while two emissions would be two records.
    lines = [r.getMessage() for r in {id(r): r for r in caplog.records}.values()]
    for setting in ("skip_prk_steps", "steps_offset", "timestep_spacing", "set_alpha_to_one", "clip_sample"):
        hits = [line for line in lines if f"{setting}=" in line]
        assert len(hits) == 1 and "\n" not in hits[0], (setting, lines)
    assert all("beta_schedule=" not in line and "prediction_type=" not in line for line in lines)  # honoured
    folder, _ = imported("ddpm_cifar10_linear_clip")
    notes = read_configs(f"diffusers:{folder}").scheduler_notes
    assert any("variance_type=" in n and "DDPMScheduler" in n for n in notes)
    assert not any("clip_sample=" in n for n in notes)  # True is what our samplers do


def test_ddim_settings_at_our_values_are_not_named_and_thresholding_names_its_own_settings():
    from pd_core.interop.schedulers import scheduler_notes

    ours = {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.0,
            "thresholding": False, "steps_offset": 0, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
            "beta_schedule": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    assert scheduler_notes("DDIMScheduler", ours, source="s.json") == ()
    notes = scheduler_notes("DDIMScheduler", {**ours, "thresholding": True, "solver_order": 2}, source="s.json")
    named = {n.split(": ", 1)[1].split("=")[0] for n in notes}
    assert named == {"thresholding", "dynamic_thresholding_ratio", "sample_max_value", "solver_order"}
    assert all(n.startswith("s.json: ") and "\n" not in n for n in notes)
