"""Stage 1 of a text-to-image pipeline at several learning rates: the stage-1 loss on held-out latents before and after.

    python -m benchmarks.text_to_image.stage1_heldout --work /tmp/stage1 --lr 1e-4 5e-4 2e-3

Runs the pipeline's own jobs (import, encode, guide-distill) on the tiny randomly initialised pipeline of
tests/sd_models.py and 64 random 8x8 captioned images (3 class captions and the empty one in turn); stage 1
trains on the first 48 latents (60 updates of 16, w ~ U[0, 4], snr_plus_one) and is scored on the last 16:
the mean over 20 fixed draws of (t, eps, w) of weight(lambda_t) ||x_hat_student(z_t, c, w) - x_hat_w(z_t, c)||^2,
before (the zero-initialised student, which is the teacher's conditional model) and after. A check that the
learning rate generalises on this plumbing-sized model, not a quality number for a real teacher.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pd_core import jobs, text_to_image
from pd_core.config import load_config
from pd_core.data.class_captions import write_caption_folder
from pd_core.denoiser import Denoiser
from pd_core.guidance import GuidanceLoss
from pd_core.interop.sd_unet import CaptionTableArch
from pd_core.models import load_model
from tests.sd_models import saved_sd_pipeline

TRAIN, HELD_OUT, DRAWS = 48, 16, 20


def table_net(store, key: str, data, *, weights: dict | None = None) -> torch.nn.Module:
    """The checkpoint at ``key`` over the data's caption table (``weights`` loaded over a fresh build if given)."""
    arch = CaptionTableArch(load_model(store, key).architecture, data.caption_embeds, data.null_embed)
    net = arch.build(dropout=0.0)
    state = net.state_dict()
    state.update(weights if weights is not None else store.load_checkpoint(key)[0])
    net.load_state_dict(state)
    return net.eval()


def held_out_losses(work: Path, lr: str) -> tuple[float, float]:
    cfg = load_config(preset="smoke", overrides=[
        f"pipeline.teacher_uri=diffusers:{saved_sd_pipeline()}", f"storage.root={work / 'store'}", "data.name=captions",
        f"data.url={work / 'data'}", f"data.limit={TRAIN}", "diffusion.weighting=snr_plus_one", "guidance.enabled=true",
        "guidance.updates=60", "guidance.batch_size=16", f"guidance.lr={lr}", "guidance.w_max=4",
        "distill.start_steps=4", f"pipeline.name=h{lr}", "guidance.log_every=60"])
    store = jobs.open_store(cfg)
    teacher = jobs.ensure_teacher(cfg, store)
    text_to_image.encode_data(cfg, store)
    student = jobs.run_guide_distill(cfg, store, teacher=teacher)
    every = cfg.model_copy(update={"data": cfg.data.model_copy(update={"limit": None})})  # held-out ones too
    data = text_to_image.encoded_train_data(every, store)
    x, y = data.images[TRAIN:], data.labels[TRAIN:]
    loss = GuidanceLoss(Denoiser(table_net(store, teacher.key, data), parameterization="eps"),
                        null_label=data.num_classes, w_min=0.0, w_max=4.0, weighting="snr_plus_one",
                        schedule=load_model(store, teacher.key).schedule, t_min=1e-3)
    before = table_net(store, student.key, data, weights=store.load_checkpoint(teacher.key)[0])
    after = table_net(store, student.key, data)
    with torch.no_grad():
        def mean_loss(net: torch.nn.Module) -> float:
            return float(torch.stack([loss(Denoiser(net, parameterization="eps"), x, y,
                                           generator=torch.Generator().manual_seed(100 + k)).mean()
                                      for k in range(DRAWS)]).mean())
        return mean_loss(before), mean_loss(after)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--lr", nargs="+", default=["1e-4", "5e-4", "2e-3"])
    args = p.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    images = torch.randint(0, 256, (TRAIN + HELD_OUT, 3, 8, 8), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    captions = ["a photo of a bag", "a photo of a coat", "a photo of a shirt", ""] * ((TRAIN + HELD_OUT) // 4)
    write_caption_folder(images, captions, str(args.work / "data"))
    for lr in args.lr:
        before, after = held_out_losses(args.work, lr)
        print(f"lr {lr}: held-out stage-1 loss before {before:.5g} after {after:.5g} "
              f"({HELD_OUT} latents x {DRAWS} draws)")


if __name__ == "__main__":
    main()
