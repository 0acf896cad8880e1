"""The losses of the two training phases and the latent scaling, as diffusers' examples compute them.

VAE phase (the KL-regularised autoencoder of latent diffusion, without its perceptual and GAN terms):
    q(z | x) = N(mu(x), diag sigma(x)^2),  z ~ q(z | x),  x_hat = D(z)
    L_vae = ||x - x_hat||^2 / D  +  beta * KL(q(z | x) || N(0, I)) / D,   D = 3 S^2 (pixels per image)
    KL = 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2)          (``DiagonalGaussianDistribution.kl``)

Latent scaling (Rombach et al., as Stable Diffusion's 0.18215 was chosen): scaling_factor = 1 / std(z)
over samples z of the training images' posteriors, so the diffusion model sees unit-variance latents.

Diffusion phase (``examples/text_to_image/train_text_to_image.py``):
    z_0 = scaling_factor * z,  z ~ q(z | x);   eps ~ N(0, I);   k ~ U{0, ..., T - 1}
    z_k = sqrt(alpha_bar_k) z_0 + sqrt(1 - alpha_bar_k) eps        (``scheduler.add_noise``)
    target = eps (epsilon) or v = sqrt(alpha_bar_k) eps - sqrt(1 - alpha_bar_k) z_0 (``get_velocity``)
    L = mean (unet(z_k, k, c).sample - target)^2,  c = text_encoder(tokens(caption))[0]
Sampling z from the posterior's mean and std, each kept once per image, is the same draw as
``vae.encode(x).latent_dist.sample()`` per batch (the VAE is frozen in this phase).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def vae_loss(vae, x: Tensor, *, kl_weight: float, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(L_vae, reconstruction MSE, KL per pixel) of a batch x (B, 3, S, S) in [-1, 1] (module docstring)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample
    mse = F.mse_loss(recon.float(), x.float())
    kl = posterior.kl().mean() / x[0].numel()
    return mse + kl_weight * kl, mse.detach(), kl.detach()


@torch.no_grad()
def posterior_stats(vae, images: Tensor, *, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Mean and std (N, C, h, w) of q(z | x) for every image, in data order."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        dist = vae.encode(images[start:start + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def scaling_factor(mean: Tensor, std: Tensor, *, generator: torch.Generator) -> float:
    """1 / std of one posterior sample per image (module docstring)."""
    z = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return float(1.0 / z.double().std())


def sample_latents(mean: Tensor, std: Tensor, *, scale: float, generator: torch.Generator) -> Tensor:
    """z_0 = scale * (mean + std * n), n ~ N(0, I): ``latent_dist.sample() * scaling_factor``."""
    return scale * (mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype))


def diffusion_target(scheduler, z0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(z0, noise, timesteps)
    raise ValueError(f"prediction_type must be epsilon or v_prediction; got {prediction!r}")


def diffusion_loss(unet, scheduler, *, z0: Tensor, noise: Tensor, timesteps: Tensor, embeds: Tensor) -> Tensor:
    """L of the diffusion phase (module docstring) for given z_0, eps, k and prompt embeddings."""
    noisy = scheduler.add_noise(z0, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
    return F.mse_loss(pred.float(), diffusion_target(scheduler, z0, noise, timesteps).float())


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str]) -> Tensor:
    """Prompt embeddings (U, L, D) as ``StableDiffusionPipeline.encode_prompt`` computes them (max-length padding)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids, attention_mask=None)[0]
