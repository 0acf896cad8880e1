"""Tiny randomly initialised diffusers UNet2DModels saved locally with save_pretrained (no hub access).

Shared by the import, export and pipeline tests. The weights are perturbed after diffusers' init so
the output depends visibly on the input and the timestep (a model fresh from init is nearly a
constant function); what the tests check is that two implementations agree on the same network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

diffusers = __import__("pytest").importorskip("diffusers")

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def tiny_unet(*, in_channels: int = 1, sample_size: int = 8, num_class_embeds: int | None = None,
              seed: int = 0, scale: float = 0.05) -> diffusers.UNet2DModel:
    """A two-level UNet2DModel (8 and 16 channels, attention at the lower level), weights perturbed by ``scale``."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 attention_head_dim=None, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return unet.eval()


def ddim_scheduler(*, prediction_type: str = "epsilon", beta_schedule: str = "linear",
                   num_train_timesteps: int = 1000) -> diffusers.DDIMScheduler:
    """diffusers' DDIM as the acceptance compares against: trailing, set_alpha_to_one, no clipping."""
    return diffusers.DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                   prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=True,
                                   timestep_spacing="trailing")


def save_teacher(folder: Path, *, prediction_type: str = "epsilon", beta_schedule: str = "linear",
                 num_train_timesteps: int = 1000, layout: str = "pipeline", in_channels: int = 1,
                 sample_size: int = 8, num_class_embeds: int | None = None, seed: int = 0) -> Path:
    """Save a tiny UNet2DModel and a DDPMScheduler config under ``folder``; returns ``folder``.

    ``layout="pipeline"``: what DDPMPipeline.save_pretrained writes (unet/, scheduler/, model_index.json);
    ``layout="model"``: the model's files with scheduler_config.json next to them.
    """
    unet = tiny_unet(in_channels=in_channels, sample_size=sample_size, num_class_embeds=num_class_embeds, seed=seed)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                        prediction_type=prediction_type)
    if layout == "pipeline":
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    elif layout == "model":
        unet.save_pretrained(str(folder))
        scheduler.save_pretrained(str(folder))
    else:
        raise ValueError(f"layout must be 'pipeline' or 'model', got {layout!r}")
    return folder


def diffusers_ddim(unet, z: torch.Tensor, *, steps: int, prediction_type: str, beta_schedule: str,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' own DDIM loop: DDIMScheduler.set_timesteps(steps), unet(x, t).sample, scheduler.step."""
    sched = ddim_scheduler(prediction_type=prediction_type, beta_schedule=beta_schedule)
    sched.set_timesteps(steps)
    x = z.clone()
    with torch.no_grad():
        for tau in sched.timesteps:
            out = unet(x, tau, class_labels=class_labels).sample
            x = sched.step(out, tau, x).prev_sample
    return x


def manifest_of(store_root: Path, key: str) -> dict:
    """The manifest.json of a checkpoint in a local store."""
    return json.loads((store_root / key / "manifest.json").read_text())


def distilled_chain(root: Path, *, prediction_type: str = "epsilon", start_steps: int = 8, classes: int | None = None,
                    overrides: tuple[str, ...] = (), num_train_timesteps: int = 1000):
    """Import a tiny teacher through ``jobs`` and distill it down to 1 step in a few updates per round.

    Returns (cfg, store, [teacher info, round infos...]); 8x8 digits, the smoke preset's round settings.
    """
    from pd_core import jobs
    from pd_core.config import load_config
    from pd_core.store import CheckpointStore

    folder = save_teacher(root / "teacher", prediction_type=prediction_type, num_class_embeds=classes,
                          num_train_timesteps=num_train_timesteps)
    cfg = load_config(preset="smoke", overrides=[
        f"pipeline.teacher_uri=diffusers:{folder}", f"storage.root={root / 'store'}",
        f"distill.start_steps={start_steps}", "distill.updates_per_round=4", "distill.checkpoint_every=2",
        "distill.log_every=2", *overrides])
    store = CheckpointStore(cfg.storage.root)
    infos = [jobs.ensure_teacher(cfg, store)]
    for round_index, _ in enumerate(cfg.distill.rounds(), start=1):
        infos.append(jobs.run_round(cfg, store, round_index=round_index, teacher=infos[-1]))
    return cfg, store, infos
