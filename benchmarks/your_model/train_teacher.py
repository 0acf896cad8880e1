"""Train a Fashion-MNIST ``UNet2DModel`` the way diffusers' own example does, and save it as a diffusers pipeline.

    python -m benchmarks.your_model.train_teacher --out runs/your_model/teacher [--updates 2400] [--threads 1]

This is the "teacher nobody here trained": nothing of the project's training code is used, only its
Fashion-MNIST reader (the IDX files, scaled to [-1, 1]). The recipe is diffusers'
``examples/unconditional_image_generation/train_unconditional.py`` at CPU size:

- ``DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")``, epsilon prediction;
- per batch: timesteps k ~ U{0, ..., 999}, ``noisy = scheduler.add_noise(x, noise, k)``,
  loss = MSE(unet(noisy, k).sample, noise);
- AdamW (betas 0.95 / 0.999, weight decay 1e-6), cosine learning rate with linear warm-up
  (``diffusers.optimization.get_cosine_schedule_with_warmup``), random horizontal flips;
- ``diffusers.training_utils.EMAModel`` with EMA warm-up (inv_gamma 1, power 3/4), whose weights are saved.

The output folder is what ``DDPMPipeline.save_pretrained`` writes (``unet/`` in safetensors,
``scheduler/``, ``model_index.json``): ``pd run --teacher-uri diffusers:<out>`` imports it.
The learning rate is larger than the example's 1e-4 because the CPU budget allows only a few
thousand updates.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from pd_core.config import DataConfig
from pd_core.data import load_split


def build_unet() -> UNet2DModel:
    """28x28x1, three levels (28, 14, 7) of 16 / 32 / 64 channels, attention at 7x7 and in the middle block."""
    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(16, 32, 64), norm_num_groups=8, attention_head_dim=None,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def _eta(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def train(*, out: Path, updates: int, batch_size: int, lr: float, warmup: int, seed: int, data_url: str | None,
          log_every: int) -> dict:
    """Train, then save the EMA weights as a DDPM pipeline under ``out``; returns what was done (also in train.json)."""
    torch.manual_seed(seed)
    data_cfg = DataConfig(name="fashion_mnist", url=data_url, image_size=28)
    data = load_split(data_cfg, split="train").images  # (N, 1, 28, 28) in [-1, 1]
    unet = build_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_schedule = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=updates)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=unet.config)
    gen = torch.Generator().manual_seed(seed)
    t0, running = time.perf_counter(), 0.0
    unet.train()
    for step in range(1, updates + 1):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x = data[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        noise = torch.randn(x.shape, generator=gen)
        k = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noisy = scheduler.add_noise(x, noise, k)
        loss = F.mse_loss(unet(noisy, k).sample.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        running += float(loss.detach())
        if step % log_every == 0 or step == updates:
            elapsed = time.perf_counter() - t0
            rate = step / elapsed
            print(f"update {step}/{updates} loss {running / log_every:.4f} lr {lr_schedule.get_last_lr()[0]:.2e} "
                  f"ema decay {ema.cur_decay_value:.4f} {rate:.2f} updates/s ETA {_eta((updates - step) / rate)}",
                  flush=True)
            running = 0.0
    seconds = time.perf_counter() - t0
    ema.copy_to(unet.parameters())
    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    record = {"updates": updates, "batch_size": batch_size, "lr": lr, "warmup": warmup, "seed": seed,
              "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in unet.parameters()), "torch": torch.__version__}
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"saved the EMA UNet2DModel and its DDPMScheduler to {out} ({seconds:.0f} s, "
          f"{updates * batch_size / len(data):.2f} epochs)", flush=True)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (a diffusers DDPM pipeline)")
    p.add_argument("--updates", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--data-url", default=None, help="Fashion-MNIST IDX folder (default: /usr/share/datasets/...)")
    args = p.parse_args()
    if args.updates < 1 or args.batch_size < 1 or not math.isfinite(args.lr) or args.lr <= 0:
        p.error("--updates and --batch-size must be >= 1 and --lr a positive number")
    torch.set_num_threads(args.threads)
    train(out=args.out, updates=args.updates, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
          seed=args.seed, data_url=args.data_url, log_every=args.log_every)


if __name__ == "__main__":
    main()
