"""The text-to-image teacher's diffusers components, built from sizes alone (no hub access, no downloads).

- a CLIP tokenizer made from ``vocab.json`` and ``merges.txt`` written here: every single character
  (with and without the end-of-word mark ``</w>``) plus, for each word of the captions, the merges
  that join it left to right (``p h``, ``ph o``, ..., ``phot o</w>``), so any caption tokenizes into
  vocabulary tokens and the caption words mostly into one token each;
- a small ``CLIPTextModel`` (frozen: diffusers' text-to-image recipe never trains the text encoder);
- an ``AutoencoderKL`` mapping 3 x S x S images to 4 x S/f x S/f latents, f = 2^(levels - 1);
- a ``UNet2DConditionModel`` over those latents with cross-attention on the prompt embedding;
- Stable Diffusion's noise schedule: ``scaled_linear`` betas from 0.00085 to 0.012 over 1000 steps,
  ``DDPMScheduler`` for training and a ``DDIMScheduler`` of the same betas for the saved pipeline
  (trailing spacing, alpha_bar_prev = 1 at the last step, no sample clipping).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from pd_core.data.class_captions import FASHION_MNIST_NAMES, TEMPLATE

SYMBOLS = string.ascii_lowercase + string.digits + ".,!?'-"


@dataclass(frozen=True)
class Sizes:
    """Everything that decides the components' shapes (part of the resume state's identity)."""

    image_size: int = 32
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers: int = 1
    attention_head_dim: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    max_length: int = 16

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


TINY = Sizes(image_size=32, vae_channels=(8, 8, 8), unet_channels=(8, 16), attention_head_dim=2, text_hidden=16,
             text_layers=1, max_length=16)


def caption_words(names: tuple[str, ...] = FASHION_MNIST_NAMES, template: str = TEMPLATE) -> list[str]:
    """The distinct words of every caption, in first-seen order (``-`` splits words, as CLIP's regex does)."""
    words = []
    for name in names:
        words += template.format(name).replace("-", " ").split()
    return list(dict.fromkeys(words))


def write_tokenizer_files(folder: Path, *, words: list[str]) -> Path:
    """vocab.json and merges.txt of a BPE that spells any text in :data:`SYMBOLS` and joins ``words``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *SYMBOLS, *(s + "</w>" for s in SYMBOLS)]
    merges = []
    for word in words:
        if len(word) < 2:
            continue
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + "</w>" if i == len(word) - 1 else ch
            merges.append(f"{prefix} {right}")
            prefix += right
            tokens.append(prefix)
    merges = list(dict.fromkeys(merges))
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(folder: Path, *, sizes: Sizes):
    files = write_tokenizer_files(folder, words=caption_words())
    return transformers.CLIPTokenizer.from_pretrained(str(files), model_max_length=sizes.max_length)


def build_text_encoder(*, sizes: Sizes, vocab_size: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=sizes.text_hidden, intermediate_size=2 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers, num_attention_heads=4, max_position_embeddings=sizes.max_length,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=sizes.text_hidden)
    return transformers.CLIPTextModel(config).eval().requires_grad_(False)


def build_vae(*, sizes: Sizes, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    levels = len(sizes.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=sizes.latent_channels,
                         block_out_channels=sizes.vae_channels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1,
                         norm_num_groups=min(8, min(sizes.vae_channels)), sample_size=sizes.image_size)


def build_unet(*, sizes: Sizes, seed: int) -> UNet2DConditionModel:
    """Cross-attention at every level but the first (the SD layout, shortened)."""
    torch.manual_seed(seed)
    levels = len(sizes.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=sizes.latent_size, in_channels=sizes.latent_channels, out_channels=sizes.latent_channels,
        block_out_channels=sizes.unet_channels, layers_per_block=sizes.unet_layers,
        norm_num_groups=min(32, min(sizes.unet_channels)), down_block_types=down, up_block_types=up,
        cross_attention_dim=sizes.text_hidden, attention_head_dim=sizes.attention_head_dim)


SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def train_scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, prediction_type=prediction_type, clip_sample=False)


def pipeline_scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=True,
                         timestep_spacing="trailing", steps_offset=1)
