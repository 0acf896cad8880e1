"""Reconstruction error of the teacher's VAE from a state file, on the first 1000 Fashion-MNIST test images.

    python -m benchmarks.text_to_image.vae_check <out>.state.pt

MSE in the [-1, 1] pixel range of x against D(mean of q(z | x)) and against D(a sample of q(z | x)),
next to the MSE of the mean test image (what a VAE that ignored its input would reach).
"""

from __future__ import annotations

import sys

import torch

from benchmarks.text_to_image import components as C
from benchmarks.text_to_image.train_teacher import TeacherConfig, load_data


def main(path: str) -> None:
    torch.set_num_threads(1)
    state = torch.load(path, weights_only=True)
    vae = C.build_vae(sizes=C.Sizes(), seed=0)
    vae.load_state_dict(state["vae"])
    vae.eval()
    x, _ = load_data(TeacherConfig(data_limit=1000), data_url=None, split="test")
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        mean_rec = vae.decode(dist.mean).sample
        sample_rec = vae.decode(dist.sample(generator=torch.Generator().manual_seed(0))).sample

    def mse(a):
        return float(((a - x) ** 2).mean())

    baseline = mse(x.mean(0, keepdim=True).expand_as(x))
    print(f"step {state['step']} test images {len(x)}: recon MSE (posterior mean) {mse(mean_rec):.5f}, "
          f"(posterior sample) {mse(sample_rec):.5f}, mean-image baseline {baseline:.5f}, "
          f"latent std {float(dist.std.mean()):.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
