"""Image-caption data encoded ONCE with a text-to-image teacher's VAE and text encoder, kept in the store.

Latents follow diffusers' text-to-image training recipe: x = scaling_factor * s, s a sample of the
VAE encoder's latent distribution N(mean(image), std(image)^2) drawn with a generator seeded by
``seed`` (one draw per image, in data order, in batches of ``ENCODE_BATCH`` images: CPU normal draws
depend on how a stream is cut into calls, so the batch is part of what decides the latents and is
fixed). The images come from the data source ``ENCODE_BATCH`` at a time
(:meth:`pd_core.data.captions.CaptionFiles.batches` decodes them as it goes), so memory holds one
batch of images and the latents (N, C, h, w), never the decoded data set; a whole
:class:`~pd_core.data.captions.CaptionData` cut into the same batches gives the same tensors bit for
bit. Captions are embedded as
``StableDiffusionPipeline.encode_prompt`` does (:func:`~pd_core.interop.sd_pipeline.encode_prompts`);
each distinct caption once: ``caption_embeds`` (U, L, D) and ``caption_index`` (N,) say which
caption each image has, and ``null_embed`` (1, L, D) is the empty prompt's.

The store key names everything that decides these tensors: the data's sha256, the encoders' sha256
(VAE, text encoder and tokenizer components of the teacher's lineage), the image size and the seed.
A changed VAE or data set is another key, never a reuse; a complete entry is loaded, not re-encoded,
and a rounds job never needs the VAE or the text encoder.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pd_core.interop.sd_folder import component_sha256
from pd_core.interop.sd_pipeline import TextToImageModel, build_text_encoder, build_tokenizer, build_vae, encode_prompts
from pd_core.store import CheckpointStore
from pd_core.train.progress import images_line

log = logging.getLogger(__name__)
ENCODERS = ("vae", "text_encoder", "tokenizer")
KIND = "encoded-captions"
ENCODE_BATCH = 64
LOG_EVERY_BATCHES = 10


class CaptionSource(Protocol):
    """Image-caption data as the encoder reads it: :class:`~pd_core.data.captions.CaptionData` (decoded whole) or
    :class:`~pd_core.data.captions.CaptionFiles` (decoded batch by batch)."""

    captions: tuple[str, ...]
    sha256: str
    source: str

    @property
    def count(self) -> int: ...

    def batches(self, batch: int) -> Iterator[Tensor]: ...


@dataclass(frozen=True)
class EncodedCaptions:
    """Latents (N, C, h, w), per-image caption index (N,), distinct caption embeddings (U, L, D), null (1, L, D)."""

    latents: Tensor
    caption_index: Tensor
    caption_embeds: Tensor
    null_embed: Tensor
    key: str
    reused: bool

    def prompt_embeds(self, index: Tensor) -> Tensor:
        """(B, L, D) prompt embeddings of examples ``index`` (B,)."""
        return self.caption_embeds[self.caption_index[index]]


def encoders_sha256(model: TextToImageModel) -> str:
    """sha256 of the VAE, text encoder and tokenizer components (their files as read)."""
    lines = "".join(f"{c} {component_sha256(model.hashes[c])}\n" for c in ENCODERS)
    return hashlib.sha256(lines.encode()).hexdigest()


def encoded_key(*, data_sha256: str, encoders: str, size: int, seed: int, limit: int | None = None) -> str:
    """Store key of one data set (its first ``limit`` examples when given) encoded by one VAE and text encoder at one
    image size and seed."""
    return f"latents/data-{data_sha256[:16]}-enc-{encoders[:16]}-{size}px-s{seed}" + (f"-n{limit}" if limit else "")


@torch.no_grad()
def encode_captions(model: TextToImageModel, data: CaptionSource, *, seed: int, batch: int = ENCODE_BATCH,
                    device: torch.device | str = "cpu", log_every: int = LOG_EVERY_BATCHES) -> dict[str, Tensor]:
    """The tensors of the module docstring for ``data`` (float32, on the CPU), the encoders run on ``device`` over
    ``batch`` images at a time; the latent draws come from a CPU generator whatever the device (the same draws
    everywhere). One log line per ``log_every`` batches (images done, rate, ETA)."""
    vae = build_vae(model).to(device)
    tokenizer, text_encoder = build_tokenizer(model), build_text_encoder(model).to(device)
    generator = torch.Generator().manual_seed(seed)
    latents, done, t0 = [], 0, time.perf_counter()
    for number, images in enumerate(data.batches(batch), start=1):
        dist = vae.encode(images.to(device)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=dist.mean.dtype)
        latents.append((dist.mean + dist.std * noise.to(dist.mean.device)).cpu() * model.scaling_factor)
        done += int(images.shape[0])
        if number % log_every == 0 or done == data.count:
            log.info(images_line("encode", done=done, total=data.count, elapsed_s=time.perf_counter() - t0))
    distinct = list(dict.fromkeys(data.captions))
    where = {text: i for i, text in enumerate(distinct)}
    embeds = torch.cat([encode_prompts(tokenizer, text_encoder, distinct[i:i + batch])
                        for i in range(0, len(distinct), batch)])
    return {"latents": torch.cat(latents).contiguous(),
            "caption_index": torch.tensor([where[t] for t in data.captions], dtype=torch.int64),
            "caption_embeds": embeds.cpu().contiguous(),
            "null_embed": encode_prompts(tokenizer, text_encoder, [""]).cpu()}


def ensure_encoded(store: CheckpointStore, model: TextToImageModel, data: CaptionSource, *, size: int,
                   seed: int, device: torch.device | str = "cpu", limit: int | None = None) -> EncodedCaptions:
    """The encoded data from the store, or encoded now and saved there (module docstring); ``limit``: the data is
    the folder's first ``limit`` examples (named in the key). ``data.sha256`` decides the key before any image is
    decoded: a reuse decodes nothing."""
    encoders = encoders_sha256(model)
    key = encoded_key(data_sha256=data.sha256, encoders=encoders, size=size, seed=seed, limit=limit)
    want = {"kind": KIND, "data_sha256": data.sha256, "encoders_sha256": encoders, "image_size": size,
            "seed": seed, "count": data.count}
    reused = store.is_complete(key)
    if reused:
        tensors, manifest = store.load_checkpoint(key)
        differs = {k: manifest.get(k) for k, v in want.items() if manifest.get(k) != v}
        if differs:
            raise ValueError(f"{store.uri(key)} holds other encodings ({differs}); delete it and rerun")
        log.info("encoded captions reused from %s (%d images)", store.uri(key), want["count"])
    else:
        tensors = encode_captions(model, data, seed=seed, device=device)
        ref = store.save_checkpoint(key, tensors=tensors, manifest={**want, "source": data.source,
                                                                      "teacher": model.source})
        log.info("encoded %d images and %d captions once to %s", want["count"],
                 tensors["caption_embeds"].shape[0], ref.uri)
    return EncodedCaptions(latents=tensors["latents"], caption_index=tensors["caption_index"],
                           caption_embeds=tensors["caption_embeds"], null_embed=tensors["null_embed"], key=key,
                           reused=reused)
