"""Train a small text-to-image latent teacher on captioned Fashion-MNIST with diffusers' components and recipe,
and save it as a Stable Diffusion-style pipeline folder.

    python -m benchmarks.text_to_image.train_teacher --out runs/text_to_image/teacher [--tiny]

Nothing of the project's training code is used, only its Fashion-MNIST reader (IDX files, padded to
32 x 32, scaled to [-1, 1], grey copied to 3 channels) and its class captions ("a photo of a
sneaker", a seeded tenth of them empty for classifier-free guidance). Two phases
(:mod:`benchmarks.text_to_image.recipe` has the equations):

1. VAE: a small ``AutoencoderKL`` (32 x 32 x 3 -> 8 x 8 x 4) trained with reconstruction MSE plus a
   small KL term; then scaling_factor = 1 / std of the latents. A VAE is trained rather than fixed
   because a randomly initialised ``AutoencoderKL`` does not invert: its decoder would turn the
   teacher's latents into images no classifier can name, so FD in our classifier's feature space and
   prompt accuracy would measure the VAE, not the distillation. A hand-made fixed map (pixel
   unshuffle) cannot be written as diffusers' ``AutoencoderKL`` weights, and the import and the stock
   pipeline both need that class. The phase is short (about a tenth of the CPU budget).
2. Diffusion: a ``UNet2DConditionModel`` with cross-attention on the frozen ``CLIPTextModel``'s prompt
   embedding, trained as ``examples/text_to_image/train_text_to_image.py`` does: DDPMScheduler with
   Stable Diffusion's scaled_linear betas, uniform timesteps, ``add_noise``, MSE on the prediction
   type; AdamW, cosine learning rate with warm-up, ``EMAModel`` whose weights are saved.

The folder is ``StableDiffusionPipeline.save_pretrained`` (safetensors, no safety checker) with a
``DDIMScheduler`` of the same betas (trailing spacing, no clipping), plus ``train.json``; ``pd run
--teacher-uri diffusers:<out>`` imports it. The tokenizer is made from files this script writes.

Resume: every ``--save-every`` updates the state (phase weights, optimizer, learning-rate schedule,
EMA, update count, the data generator's state, and the settings that decide the weights) is written
atomically to ``<out>.state.pt``; a rerun after a kill continues from it and ends with the weights an
uninterrupted run ends with. A state written with other settings is refused (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from benchmarks.text_to_image import components as C
from benchmarks.text_to_image import recipe
from pd_core.config import DataConfig
from pd_core.data import load_split
from pd_core.data.class_captions import FASHION_MNIST_NAMES, class_captions

STATE_VERSION = 1


@dataclass(frozen=True)
class TeacherConfig:
    """Every setting that decides the teacher's weights (a resume state must have been written with these)."""

    sizes: C.Sizes = C.Sizes()
    vae_updates: int = 600
    unet_updates: int = 15000
    batch_size: int = 64
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    warmup: int = 200
    kl_weight: float = 1e-3
    ema_decay: float = 0.9999
    prediction_type: str = "epsilon"
    empty_fraction: float = 0.1
    data_limit: int | None = None
    seed: int = 0


def tiny_config(**changes) -> TeacherConfig:
    """Seconds-sized: 32 x 32 images, a three-level VAE of 8 channels, a UNet of 8 and 16, 256 images."""
    base = dict(sizes=C.TINY, vae_updates=4, unet_updates=6, batch_size=8, warmup=2, data_limit=256)
    return TeacherConfig(**{**base, **changes})


def identity(cfg: TeacherConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def load_data(cfg: TeacherConfig, *, data_url: str | None, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """The first ``cfg.data_limit`` images (N, 3, S, S) in [-1, 1] of ``split`` and one caption each."""
    data = load_split(DataConfig(name="fashion_mnist", url=data_url, image_size=cfg.sizes.image_size,
                                 limit=cfg.data_limit), split=split)
    images, labels = data.images[: cfg.data_limit], data.labels[: cfg.data_limit]
    captions = class_captions(labels, names=FASHION_MNIST_NAMES, empty_fraction=cfg.empty_fraction, seed=cfg.seed)
    return images.expand(-1, 3, -1, -1).contiguous(), captions


def _eta(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{int(seconds % 60):02d}s"


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class StateMismatch(ValueError):
    """A resume state written with other settings."""


def _load_state(path: Path, cfg: TeacherConfig) -> dict | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != STATE_VERSION or state.get("identity") != identity(cfg):
        theirs = state.get("identity") or {}
        diff = sorted(k for k in identity(cfg) if theirs.get(k) != identity(cfg)[k]) or ["version"]
        raise StateMismatch(f"{path}: written with other settings ({', '.join(diff)}); use the same settings "
                            f"to resume, or delete the state file to start over")
    return state


class Trainer:
    """Both phases over one update counter 1 .. vae_updates + unet_updates; ``run`` resumes from the state file."""

    def __init__(self, cfg: TeacherConfig, *, out: Path, data_url: str | None, save_every: int, log_every: int):
        self.cfg, self.out, self.save_every, self.log_every = cfg, out, save_every, log_every
        self.state_path = out.with_name(out.name + ".state.pt")
        self.images, self.captions = load_data(cfg, data_url=data_url)
        self.tokenizer = C.build_tokenizer(out.with_name(out.name + ".tokenizer"), sizes=cfg.sizes)
        self.text_encoder = C.build_text_encoder(sizes=cfg.sizes, vocab_size=len(self.tokenizer), seed=cfg.seed)
        self.vae = C.build_vae(sizes=cfg.sizes, seed=cfg.seed)
        self.unet = C.build_unet(sizes=cfg.sizes, seed=cfg.seed + 1)
        self.scheduler = C.train_scheduler(cfg.prediction_type)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=1e-6)
        self.unet_opt = torch.optim.AdamW(self.unet.parameters(), lr=cfg.unet_lr, betas=(0.9, 0.999),
                                          weight_decay=1e-2)
        self.vae_lr = get_cosine_schedule_with_warmup(self.vae_opt, num_warmup_steps=min(cfg.warmup, cfg.vae_updates),
                                                      num_training_steps=cfg.vae_updates)
        self.unet_lr = get_cosine_schedule_with_warmup(self.unet_opt, num_warmup_steps=cfg.warmup,
                                                       num_training_steps=cfg.unet_updates)
        self.ema = EMAModel(self.unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0,
                            power=3 / 4)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.scale = 0, None
        self.latent_stats = None

    def state(self) -> dict:
        return {"version": STATE_VERSION, "identity": identity(self.cfg), "step": self.step, "scale": self.scale,
                "rng": self.gen.get_state(), "text_encoder": self.text_encoder.state_dict(),
                "vae": self.vae.state_dict(), "vae_opt": self.vae_opt.state_dict(),
                "vae_lr": self.vae_lr.state_dict(), "unet": self.unet.state_dict(),
                "unet_opt": self.unet_opt.state_dict(), "unet_lr": self.unet_lr.state_dict(),
                "ema": self.ema.state_dict()}

    def restore(self, state: dict) -> None:
        self.step, self.scale = state["step"], state["scale"]
        self.gen.set_state(state["rng"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.vae.load_state_dict(state["vae"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.vae_lr.load_state_dict(state["vae_lr"])
        self.unet.load_state_dict(state["unet"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.unet_lr.load_state_dict(state["unet_lr"])
        self.ema.load_state_dict(state["ema"])

    def _batch(self) -> torch.Tensor:
        return torch.randint(0, len(self.images), (self.cfg.batch_size,), generator=self.gen)

    def vae_update(self) -> float:
        self.vae.train()
        loss, _, _ = recipe.vae_loss(self.vae, self.images[self._batch()], kl_weight=self.cfg.kl_weight,
                                     generator=self.gen)
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.vae_opt.step()
        self.vae_lr.step()
        return float(loss.detach())

    def _prepare_latents(self) -> None:
        """Posterior stats of every image (frozen VAE), prompt embeddings of every distinct caption, the scale."""
        self.vae.eval()
        mean, std = recipe.posterior_stats(self.vae, self.images)
        distinct = sorted(set(self.captions))
        where = {c: i for i, c in enumerate(distinct)}
        self.embeds = recipe.encode_captions(self.tokenizer, self.text_encoder, distinct)
        self.caption_index = torch.tensor([where[c] for c in self.captions])
        self.latent_stats = (mean, std)
        if self.scale is None:
            self.scale = recipe.scaling_factor(mean, std, generator=self.gen)
            print(f"latents {tuple(mean.shape[1:])}: scaling_factor {self.scale:.5f}", flush=True)

    def unet_update(self) -> float:
        self.unet.train()
        idx = self._batch()
        mean, std = self.latent_stats
        z0 = recipe.sample_latents(mean[idx], std[idx], scale=self.scale, generator=self.gen)
        noise = torch.randn(z0.shape, generator=self.gen)
        k = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(idx),), generator=self.gen)
        loss = recipe.diffusion_loss(self.unet, self.scheduler, z0=z0, noise=noise, timesteps=k,
                                     embeds=self.embeds[self.caption_index[idx]])
        self.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.unet_opt.step()
        self.unet_lr.step()
        self.ema.step(self.unet.parameters())
        return float(loss.detach())

    def run(self, *, stop_after: int | None = None) -> dict | None:
        """Train to the end (resuming from the state file) and save the pipeline; ``stop_after`` ends the process's
        work after that many updates without saving anything more, as a kill would."""
        state = _load_state(self.state_path, self.cfg)
        if state is not None:
            self.restore(state)
            print(f"resumed from {self.state_path} at update {self.step}", flush=True)
        cfg, total = self.cfg, self.cfg.vae_updates + self.cfg.unet_updates
        t0, cpu0, done0, running = time.perf_counter(), time.process_time(), self.step, []
        while self.step < total:
            if stop_after is not None and self.step >= stop_after:
                return None
            phase = "vae" if self.step < cfg.vae_updates else "unet"
            if phase == "unet" and self.latent_stats is None:
                self._prepare_latents()
                t0, cpu0, done0 = time.perf_counter(), time.process_time(), self.step
            running.append(self.vae_update() if phase == "vae" else self.unet_update())
            self.step += 1
            if not math.isfinite(running[-1]):
                raise FloatingPointError(f"{phase} loss is {running[-1]} at update {self.step}; lower the learning "
                                         f"rate (the state file holds the last finite update)")
            if self.step % self.save_every == 0 or self.step in (cfg.vae_updates, total):
                _save_state(self.state_path, self.state())
            if self.step % self.log_every == 0 or self.step in (cfg.vae_updates, total):
                rate = (self.step - done0) / (time.perf_counter() - t0)
                cpu_rate = (self.step - done0) / max(time.process_time() - cpu0, 1e-9)
                print(f"{phase} update {self.step}/{total} loss {sum(running) / len(running):.4f} {rate:.2f} updates/s "
                      f"({cpu_rate:.2f} per CPU second) "
                      f"phase ETA {_eta(((cfg.vae_updates if phase == 'vae' else total) - self.step) / rate)}",
                      flush=True)
                running = []
        return self.save()

    def save(self) -> dict:
        if self.latent_stats is None:
            self._prepare_latents()
        self.ema.copy_to(self.unet.parameters())
        self.vae.register_to_config(scaling_factor=self.scale)
        pipe = StableDiffusionPipeline(vae=self.vae.eval(), text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet.eval(), scheduler=C.pipeline_scheduler(self.cfg.prediction_type),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(str(self.out), safe_serialization=True)
        record = {**identity(self.cfg), "scaling_factor": self.scale, "threads": torch.get_num_threads(),
                  "images": len(self.images), "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
                  "vae_parameters": sum(p.numel() for p in self.vae.parameters()), "torch": torch.__version__}
        (self.out / "train.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"saved the Stable Diffusion-style pipeline (EMA UNet) to {self.out}", flush=True)
        return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TeacherConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output pipeline folder")
    p.add_argument("--tiny", action="store_true", help="seconds-sized models and data (a smoke run)")
    p.add_argument("--vae-updates", type=int, default=None, help=f"default {d.vae_updates}")
    p.add_argument("--unet-updates", type=int, default=None, help=f"default {d.unet_updates}")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many updates, as a kill would")
    p.add_argument("--data-url", default=None, help="Fashion-MNIST IDX folder (default: /usr/share/datasets/...)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TeacherConfig:
    changes = {k: v for k, v in (("vae_updates", args.vae_updates), ("unet_updates", args.unet_updates),
                                 ("batch_size", args.batch_size)) if v is not None}
    changes.update(prediction_type=args.prediction_type, seed=args.seed)
    for name, value in changes.items():
        if name != "prediction_type" and (value < 1 and name != "seed" or value < 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")
    return tiny_config(**changes) if args.tiny else TeacherConfig(**changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.save_every < 1 or args.log_every < 1 or args.threads < 1:
            raise ValueError("--save-every, --log-every and --threads must be >= 1")
        torch.set_num_threads(args.threads)
        trainer = Trainer(cfg, out=args.out, data_url=args.data_url, save_every=args.save_every,
                          log_every=1 if args.tiny else args.log_every)
        trainer.run(stop_after=args.stop_after)
    except (ValueError, StateMismatch) as err:
        print(f"train_teacher: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
