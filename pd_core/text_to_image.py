"""The jobs of a text-to-image pipeline (a Stable Diffusion-style teacher): import the teacher, encode the data
once, and hand the rounds the encoded latents with caption indices as class labels.

A pipeline is text-to-image when ``data.name`` is ``captions`` (an image-caption folder, which the
config accepts only with ``pipeline.teacher_uri = diffusers:<folder>``). Its teacher is the folder's
UNet2DConditionModel as a store checkpoint whose parent is the hash of every file a load of the
pipeline reads (:func:`pd_core.interop.sd_folder.source_sha256`). The data is encoded ONCE
(:func:`pd_core.interop.sd_latents.ensure_encoded`: latents x = scaling_factor * s, s ~ the VAE's latent
distribution; each distinct caption's embedding c_u; the empty prompt's c_0) under a key naming the
data, the encoders, the image size and the seed; ``pipelines/<name>/encoded-data.json`` points at it.
Every job after that reads those tensors and never builds the VAE or the text encoder.

The rounds and stage 1 are the class-conditional jobs unchanged: example i has label y_i = the index
of its caption among the U distinct ones, and :class:`~pd_core.interop.sd_unet.CaptionTableArch` builds
net(z, lambda, y[, w]) = unet(z, tau(lambda), table[y][, phi_d(w)]) with table = [c_0 .. c_{U-1}; c_0']
(row U the empty prompt: the null class), so the guided model (1 + w) eps(z, c) - w eps(z, c_0) is
:class:`pd_core.guidance.GuidedDenoiser` at null label U.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from pd_core import dist, finite, lineage
from pd_core.config import Config, ConfigError
from pd_core.data import ImageData
from pd_core.data.captions import has_split, load_caption_texts, scan_captions
from pd_core.data.common import DatasetError
from pd_core.interop.diffusers_folder import check_timesteps, diffusers_location
from pd_core.interop.sd_folder import component_hashes, read_text_to_image, source_sha256
from pd_core.interop.sd_latents import ensure_encoded
from pd_core.interop.sd_pipeline import read_text_to_image_model, teacher_checkpoint
from pd_core.interop.sd_unet import CaptionTableArch, TextUNetCondition
from pd_core.job_checkpoints import CheckpointInfo, _manifest, pipeline_prefix, teacher_key
from pd_core.store import CheckpointStore, StoreError
from pd_core.train import resolve_runtime

log = logging.getLogger("pd_core.jobs")


def is_text_pipeline(cfg: Config) -> bool:
    """Whether ``cfg`` describes a text-to-image pipeline (image-caption data, a Stable Diffusion-style teacher)."""
    return cfg.data.name == "captions"


def encoded_pointer_key(name: str) -> str:
    """``pipelines/<name>/encoded-data.json``: which encoded data the pipeline's jobs train on."""
    return f"{pipeline_prefix(name)}/encoded-data.json"


@dataclass(frozen=True)
class EncodedInfo:
    """Where a pipeline's encoded data is: its store key and checkpoint sha256, image and caption counts."""

    key: str
    sha256: str
    count: int
    captions: int
    reused: bool


@dataclass(eq=False)
class CaptionLatents(ImageData):
    """Encoded training data as ImageData: ``images`` the latents, ``labels`` the caption indices, plus the table."""

    caption_embeds: Tensor  # (U, L, D): the distinct captions' embeddings
    null_embed: Tensor  # (1, L, D): the empty prompt's
    encoded_sha256: str  # the encoded checkpoint's sha256 (what the rounds' lineage records)

    def to(self, device: torch.device | str) -> CaptionLatents:
        return CaptionLatents(self.images.to(device), self.labels.to(device), self.num_classes, self.name,
                              self.caption_embeds.to(device), self.null_embed.to(device), self.encoded_sha256)


def _options(cfg: Config) -> dict:
    return dict(cfg.storage.storage_options)


def text_source_sha256(cfg: Config) -> str:
    """The lineage hash of the folder at ``pipeline.teacher_uri`` (every file a load reads, hashed streaming)."""
    tti = read_text_to_image(cfg.pipeline.teacher_uri or "", storage_options=_options(cfg))
    return source_sha256(component_hashes(tti))


def preflight_caption_data(cfg: Config) -> None:
    """Before a run starts: ConfigError (one line naming the field) unless ``data.url`` has a readable metadata.jsonl
    and each of ``eval.class_names`` (when evaluating) is some caption's text."""
    url = cfg.data.url or ""
    try:
        captions = set(load_caption_texts(url, split="train"))
    except DatasetError as err:
        raise ConfigError(f"data.url: {err}") from None
    names, template = cfg.eval.class_names or [], cfg.eval.prompt_template
    missing = [n for n in names if template.format(n) not in captions] if cfg.eval.enabled else []
    if missing:
        raise ConfigError(f"eval.class_names: no caption of {url} is {template.format(missing[0])!r} ({len(missing)} "
                          f"of {len(names)} classes named by no caption); name the classes the captions name, or set "
                          f"eval.prompt_template to their wording")


def caption_data_warning(cfg: Config) -> str | None:
    """One warning line when the evaluation's FD reference is the training images (a flat caption folder with no
    ``test/metadata.jsonl``); None otherwise."""
    if not cfg.eval.enabled or cfg.data.name != "captions" or has_split(cfg.data.url or "", "test"):
        return None
    return (f"warning: {cfg.data.url} has no test split (test/metadata.jsonl): the training images are the FD "
            f"reference of the evaluation")


def import_text_teacher(cfg: Config, store: CheckpointStore, *, uri: str) -> CheckpointInfo:
    """Import the folder's UNet2DConditionModel and scheduler as this pipeline's teacher (parent: the folder's hash).

    The checkpoint holds the UNet's tensors (safetensors, never unpickled), its config, the scheduler
    config and discrete schedule, the parameterization its ``prediction_type`` names, and every
    component's file hashes; ``distill.start_steps`` must not be finer than the scheduler's timesteps.
    """
    model = read_text_to_image_model(uri, storage_options=_options(cfg))
    start = cfg.distill.start_steps
    check_timesteps(steps=start, num_train_timesteps=model.schedule.num_timesteps, source=uri)
    tensors, fields = teacher_checkpoint(model)
    # how to reach the folder again (`pd sample`, `pd export`): the store's fsspec options, never credentials
    fields["text_to_image"] = {**fields["text_to_image"], "storage_options": _options(cfg)}
    bad = finite.nonfinite_weights(tensors)
    if bad:
        raise finite.NonFiniteOutputError(f"teacher at {uri}: {bad} of its UNet weights are NaN or infinite; nothing "
                                          f"was imported: point pipeline.teacher_uri at a model with finite weights")
    want = lineage.teacher_lineage(cfg, source_sha256=model.source_sha256)
    extra = {k: v for k, v in fields.items() if k != "parent_sha256"}  # the lineage's parent is the same hash
    manifest = _manifest(cfg, kind="teacher", spec=None, steps=start, round_index=0, lineage_=want,
                         schedule=model.schedule, extra={"imported_from": uri, **extra})
    key = teacher_key(cfg.pipeline.name)
    ref = dist.run_on_main(lambda: store.save_checkpoint(key, tensors=tensors, manifest=manifest))
    log.info("teacher imported from %s (UNet2DConditionModel, %s prediction, %d timesteps) to %s",
             diffusers_location(uri), model.parameterization, model.schedule.num_timesteps, ref.uri)
    return CheckpointInfo(key=key, uri=ref.uri, sha256=ref.sha256, steps=start, round=0, trained=False,
                          train_seconds=0.0, resumed_from=0)


def encode_data(cfg: Config, store: CheckpointStore) -> EncodedInfo:
    """Encode ``data.url`` (train split; its first ``data.limit`` examples when set, named in the key) with the
    teacher's VAE and text encoder once (reused when stored) and point the pipeline at it. The only job that builds
    the VAE and the text encoder. The folder is hashed first (bytes only) and decoded batch by batch only when it is
    encoded: memory holds one batch of images, not the data set."""
    model = read_text_to_image_model(cfg.pipeline.teacher_uri or "", storage_options=_options(cfg))
    data = scan_captions(cfg.data.url or "", size=cfg.data.image_size, split="train", limit=cfg.data.limit)
    encoded = ensure_encoded(store, model, data, size=cfg.data.image_size, seed=cfg.pipeline.seed,
                             device=resolve_runtime(cfg.runtime).device, limit=cfg.data.limit)
    manifest = store.read_manifest(encoded.key) or {}
    info = EncodedInfo(key=encoded.key, sha256=str(manifest.get("sha256")), count=int(encoded.latents.shape[0]),
                       captions=int(encoded.caption_embeds.shape[0]), reused=encoded.reused)
    pointer = json.dumps({"key": info.key, "sha256": info.sha256, "count": info.count, "captions": info.captions})
    dist.run_on_main(lambda: store.put_bytes(encoded_pointer_key(cfg.pipeline.name), pointer.encode()))
    return info


def encoded_train_data(cfg: Config, store: CheckpointStore) -> CaptionLatents:
    """The pipeline's encoded data (first ``data.limit`` examples) as class-labelled latents; StoreError when the
    encode job has not run or what it pointed at changed."""
    pointer_key = encoded_pointer_key(cfg.pipeline.name)
    if not store.exists(pointer_key):
        raise StoreError(f"{store.uri(pointer_key)} does not exist: the data is encoded by the pipeline's encode task "
                         f"(pd run runs it before stage 1 and the rounds)")
    pointer = json.loads(store.get_bytes(pointer_key))
    tensors, manifest = store.load_checkpoint(pointer["key"])
    if manifest.get("sha256") != pointer["sha256"]:
        raise StoreError(f"{store.uri(pointer['key'])} changed since it was encoded for this pipeline; rerun pd run")
    n = cfg.data.limit or int(tensors["latents"].shape[0])
    return CaptionLatents(images=tensors["latents"][:n].float().contiguous(), labels=tensors["caption_index"][:n],
                          num_classes=int(tensors["caption_embeds"].shape[0]), name="captions",
                          caption_embeds=tensors["caption_embeds"].float(), null_embed=tensors["null_embed"].float(),
                          encoded_sha256=pointer["sha256"])


def encoded_sha256(cfg: Config, store: CheckpointStore) -> str | None:
    """The sha256 of the encoded data a text-to-image pipeline trains on (what its jobs' lineage records), read from
    the pointer alone; None for other pipelines or before the encode job ran (the data load then says so)."""
    if not is_text_pipeline(cfg):
        return None
    pointer_key = encoded_pointer_key(cfg.pipeline.name)
    return json.loads(store.get_bytes(pointer_key))["sha256"] if store.exists(pointer_key) else None


def teacher_folder_sha256(cfg: Config, store: CheckpointStore) -> str | None:
    """The hash of the folder a text-to-image pipeline's teacher was imported from (its manifest's
    ``text_to_image.sha256``: what its jobs' lineage records besides the parent); None for other pipelines."""
    if not is_text_pipeline(cfg):
        return None
    manifest = store.read_manifest(teacher_key(cfg.pipeline.name)) or {}
    info = manifest.get("text_to_image")
    return info.get("sha256") if isinstance(info, dict) else None


def with_caption_table(arch, data: ImageData):
    """``arch`` over the caption table of ``data`` when it is a text UNet (:class:`CaptionTableArch`); else ``arch``."""
    if not isinstance(arch, TextUNetCondition):
        return arch
    if not isinstance(data, CaptionLatents):
        raise ValueError("a text-to-image UNet trains on encoded image-caption data (data.name captions)")
    return CaptionTableArch(arch, data.caption_embeds, data.null_embed)


def source_fields(manifest: dict) -> dict:
    """The ``text_to_image`` field (the folder a text UNet's VAE, text encoder and tokenizer come from, and its
    hashes) a student's manifest carries on from its teacher's, so it samples and exports on its own; {}."""
    return {"text_to_image": manifest["text_to_image"]} if "text_to_image" in manifest else {}


def folder_of(manifest: dict, *, storage_options: dict | None = None, source: str = "the model"):
    """The text-to-image folder a text UNet checkpoint's manifest names (``text_to_image``), read with
    ``storage_options`` (default: the fsspec options it was imported with, recorded there) and checked to be the
    one it was made from (its hash); ValueError naming the folder otherwise."""
    info = manifest.get("text_to_image")
    if not isinstance(info, dict) or not info.get("source"):
        raise ValueError(f"{source} records no text-to-image folder (manifest field text_to_image): it cannot be "
                         f"decoded or prompted; use a checkpoint `pd run` made from a diffusers:<pipeline folder>")
    options = storage_options if storage_options is not None else info.get("storage_options")
    model = read_text_to_image_model(info["source"], storage_options=dict(options or {}))
    if model.source_sha256 != info.get("sha256"):
        raise ValueError(f"{info['source']} changed since {source} was made from it (sha256 {model.source_sha256[:12]} "
                         f"!= {str(info.get('sha256'))[:12]}): its VAE or text encoder is not the one the model knows")
    return model
