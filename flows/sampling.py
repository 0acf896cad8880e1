"""CLI helpers outside the pipeline flow: sample a model into a grid, evaluate one model, show a pipeline.

The command line's own bounds are checked before this module is imported (:mod:`flows.cli_args`);
what needs the model (its step count, its image size, the memory a sample takes) is checked here,
each a :class:`~flows.cli_args.BadArgument` (exit 2) or a one-line warning.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load_file

from flows.cli_args import BadArgument
from pd_core import evaluation, images, jobs, samplers, text_to_image
from pd_core.config import Config
from pd_core.guidance import guided
from pd_core.interop.diffusers_folder import check_timesteps
from pd_core.interop.sd_sampling import PromptSampler, prompt_grid
from pd_core.interop.sd_unet import TextUNetCondition
from pd_core.models import (
    LoadedModel,
    load_model,
    load_model_uri,
    manifest_schedule,
    model_from_files,
    model_from_tensors,
    split_uri,
)
from pd_core.schedule import DiscreteSchedule
from pd_core.store import NOT_SAVED, CheckpointStore
from pd_core.train import resolve_device, resolve_runtime
from tasks.env import offline_environment, project_home

log = logging.getLogger("pd_core.sampling")

MAX_SAMPLE_BYTES = 4 * 2**30  # the float32 images `pd sample` holds before writing the grid
_PIPELINE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/(teacher|guided|rounds/[0-9]{2}-[0-9]{4})$")


def default_tracking_uri() -> str:
    """Where `pd run` tracks by default: $MLFLOW_TRACKING_URI, else the project's sqlite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_home() / 'mlflow.db'}"


def pipeline_location(uri: str) -> tuple[str, str] | None:
    """``<root>/pipelines/<name>/rounds/03-0032`` -> (``<root>``, ``pipelines/<name>/rounds/03-0032``); same for a
    teacher; None when ``uri`` is not a checkpoint of a pipeline (then it has no pipeline store)."""
    head, sep, tail = uri.rstrip("/").rpartition("/pipelines/")
    if not sep or not head or not _PIPELINE_KEY.match(tail):
        return None
    return head, f"pipelines/{tail}"


def warn_other_steps(manifest: dict, steps: int) -> None:
    """One warning line when a distilled student is sampled with another step count than it was trained for."""
    trained = int(manifest.get("steps") or 0)
    if manifest.get("kind") in ("student", "guided_student") and trained and steps != trained:
        log.warning("--steps %d: this student was distilled to sample in %d step(s); other step counts are allowed "
                    "but rarely what you want", steps, trained)


def write_atomically(url: str, data: bytes) -> None:
    """Write ``data`` to a path (temp file in the same folder, fsync, rename) or fsspec URL (one PUT)."""
    if "://" in url and not url.startswith("file://"):
        fs, path = fsspec.core.url_to_fs(url)
        fs.pipe_file(path, data)  # an object store shows the whole object or none of it
        return
    final = Path(url.removeprefix("file://")).expanduser()
    tmp = final.with_name(f".tmp-{uuid.uuid4().hex}-{final.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_any_model(model: str, *, device: torch.device, tracking_uri: str | None = None) -> LoadedModel:
    """A checkpoint folder URI (file://, s3://, a path) or an MLflow model URI (models:/..., runs:/...)."""
    if model.startswith(("models:/", "runs:/")):
        from tasks.tracking import load_sampler_from_mlflow

        with tempfile.TemporaryDirectory(prefix="pd-mlflow-model-") as tmp:  # removed once the weights are loaded
            weights_path, manifest = load_sampler_from_mlflow(model, dst_dir=tmp,
                                                              tracking_uri=tracking_uri or default_tracking_uri())
            return model_from_files(weights_path=weights_path, manifest=manifest, device=device)
    return load_model_uri(model, device=device)


def sample_labels(loaded: LoadedModel, *, num: int, label: int | None, guidance: float | None) -> torch.Tensor | None:
    """The class of each image for a class-conditional model (``label``, else image i asks for class i mod K);
    None for an unconditional one, which refuses ``--label`` and ``--guidance`` (BadArgument, like a
    ``--label`` the model has no class for)."""
    num_classes = loaded.num_classes
    if num_classes < 1:
        if label is not None or guidance is not None:
            raise BadArgument("--label and --guidance need a class-conditional model; this one is unconditional")
        return None
    if label is not None and not 0 <= label < num_classes:
        raise BadArgument(f"--label must be a class in [0, {num_classes - 1}]; got {label}")
    if label is not None:
        return torch.full((num,), label, dtype=torch.long)
    return torch.arange(num, dtype=torch.long) % num_classes


def sample_images(loaded: LoadedModel, *, steps: int, num: int, sampler: str, gamma: float, seed: int,
                  batch_size: int, device: torch.device, labels: torch.Tensor | None = None,
                  guidance: float = 0.0) -> torch.Tensor:
    """Draw ``num`` images in batches from noise seeded by ``seed``; returns (num, C, H, W) in [-1, 1] on CPU.

    A class-conditional model samples ``labels`` (num,) (default: classes 0, 1, ..., K - 1, 0, ... in
    order, a grid row per class when its width is K) at guidance weight ``guidance``
    (:func:`pd_core.guidance.guided`).
    """
    if labels is None and loaded.num_classes:
        labels = torch.arange(num, dtype=torch.long) % loaded.num_classes
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    with torch.inference_mode():
        for start in range(0, num, batch_size):
            b = min(batch_size, num - start)
            z = torch.randn((b, *loaded.image_shape), generator=gen).to(device)
            denoiser = loaded.denoiser
            if labels is not None:
                denoiser = guided(denoiser, arch=loaded.architecture, y=labels[start:start + b].to(device),
                                  w=guidance)
            if sampler == "ddim":
                x = samplers.ddim(denoiser, z, num_steps=steps, schedule=loaded.schedule)
            elif sampler == "stochastic":
                x = samplers.ancestral(denoiser, z, num_steps=steps, gamma=gamma,
                                       generator=gen_for(device, seed + start), schedule=loaded.schedule)
            elif sampler == "two-step":
                x = samplers.stochastic_two_step(denoiser, z, num_steps=steps, generator=gen_for(device, seed + start),
                                                 schedule=loaded.schedule)
            else:
                x = samplers.heun(denoiser, z, num_steps=steps, schedule=loaded.schedule)
            out.append(x.float().cpu())
    return torch.cat(out)


def gen_for(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def sample_to_grid(*, model: str, steps: int | None, num: int, out: str, sampler: str, gamma: float, seed: int,
                   batch_size: int, device: str, throughput: bool, tracking_uri: str | None = None,
                   scale: int | None = None, label: int | None = None, guidance: float | None = None,
                   prompts: list[str] | None = None) -> str:
    """``pd sample``: write a PNG grid of ``num`` samples for people (atomically; upscaled by ``scale``, default:
    to at least 512 px wide, captioned with the model, steps and sampler); return a one-line summary.

    A class-conditional model samples class ``label`` (default: image i asks for class i mod K, so with
    K columns each column is one class) at guidance weight ``guidance`` (default 0). A text-to-image model
    samples ``prompts`` instead (:func:`sample_prompt_grid`).
    Bounds are checked by the CLI (:func:`flows.cli_args.check_sampling`); here: the memory the images
    take, the label against the model's classes, and a warning when a student is sampled with other
    steps than it was distilled for.
    """
    offline_environment()
    try:
        dev = resolve_device(device)
    except ValueError:
        raise BadArgument("--device cuda: no CUDA device is available; use --device cpu") from None
    loaded = load_any_model(model, device=dev, tracking_uri=tracking_uri)
    steps = steps or loaded.steps
    if isinstance(loaded.schedule, DiscreteSchedule):
        check_timesteps(steps=steps, num_train_timesteps=loaded.schedule.num_timesteps, source=model, field="--steps")
    warn_other_steps(loaded.manifest, steps)
    if isinstance(loaded.architecture, TextUNetCondition):
        return sample_prompt_grid(loaded, model=model, steps=steps, prompts=prompts, num=num, out=out, seed=seed,
                                  guidance=guidance or 0.0, scale=scale, device=dev, batch_size=batch_size)
    if prompts:
        raise BadArgument("--prompt needs a text-to-image model (a student of a diffusers:<pipeline folder> teacher)")
    c, h, w = loaded.image_shape
    need = num * c * h * w * 4
    if need > MAX_SAMPLE_BYTES:
        raise BadArgument(f"--num {num}: {num} images of {c}x{h}x{w} take {need / 2**30:.1f} GiB, more than the "
                          f"{MAX_SAMPLE_BYTES / 2**30:.0f} GiB `pd sample` holds; lower --num")
    labels = sample_labels(loaded, num=num, label=label, guidance=guidance)
    nrow = loaded.num_classes if labels is not None and label is None else None
    try:  # the grid's size follows from the arguments: refused before any image is sampled
        images.check_display_grid_size(num=num, height=h, width=w, nrow=nrow, scale=scale)
    except ValueError as err:
        raise BadArgument(f"--num {num}{f' --scale {scale}' if scale else ''}: {err}") from None
    t0 = time.perf_counter()
    x = sample_images(loaded, steps=steps, num=num, sampler=sampler, gamma=gamma, seed=seed, batch_size=batch_size,
                      device=dev, labels=labels, guidance=guidance or 0.0)
    seconds = time.perf_counter() - t0
    caption = images.grid_caption(pipeline=str(loaded.manifest.get("pipeline") or model), manifest=loaded.manifest,
                                  sampler=sampler, steps=steps, w=None if labels is None else guidance or 0.0)
    write_atomically(out, images.png_bytes(images.display_grid(x, caption=caption, scale=scale, nrow=nrow)))
    what = "" if labels is None else f", {'class ' + str(label) if label is not None else 'every class'}, " \
                                     f"guidance w = {guidance or 0.0:g}"
    line = f"wrote {num} samples ({sampler}, {steps} step{'' if steps == 1 else 's'}{what}) to {out}"
    if throughput:
        line += f"; {num / seconds:.1f} images/s ({seconds / num * 1e3:.2f} ms/image on {dev.type})"
    return line


def prompt_sampler_of(loaded: LoadedModel, *, source: str) -> PromptSampler:
    """The text UNet of ``loaded`` with the VAE, text encoder and tokenizer of the folder its manifest names."""
    try:
        folder = text_to_image.folder_of(loaded.manifest, source=source)
    except ValueError as err:
        raise BadArgument(str(err)) from None
    return PromptSampler.of(folder, unet=loaded.denoiser.net.unet, parameterization=loaded.denoiser.parameterization)


def prompt_images(loaded: LoadedModel, *, source: str, prompts: list[str], num: int, steps: int, seed: int,
                  guidance: float, device: torch.device, batch_size: int | None = None,
                  sampler: PromptSampler | None = None) -> tuple[torch.Tensor, str]:
    """(images (P num, 3, H, W) in [-1, 1], caption): ``num`` samples per prompt, one row per prompt, from latent
    noise seeded by ``seed``, ``batch_size`` at a time (:func:`pd_core.interop.sd_sampling.prompt_grid`)."""
    sampler = sampler or prompt_sampler_of(loaded, source=source)
    for module in (sampler.vae, sampler.text_encoder):
        module.to(device)
    return prompt_grid(sampler, prompts=prompts, per_prompt=num, w=guidance, steps=steps, seed=seed,
                       batch_size=batch_size)


def prompt_image_shape(sampler: PromptSampler) -> tuple[int, int, int]:
    """The decoded images' shape: the VAE's output channels and the latent size times its 2^(blocks - 1) factor."""
    config = sampler.vae.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    c, h, w = sampler.latent_shape
    return int(config.out_channels), h * factor, w * factor


def sample_prompt_grid(loaded: LoadedModel, *, model: str, steps: int, prompts: list[str] | None, num: int, out: str,
                       seed: int, guidance: float, scale: int | None, device: torch.device,
                       batch_size: int | None = None) -> str:
    """``pd sample --prompt`` of a text-to-image model: a grid with one row of ``num`` images per prompt, captioned
    with the prompts, the step count and w; a guided student takes w itself (one UNet call a step), a teacher or
    an unguided student at w > 0 is classifier-free guided (two). The images' memory and the grid's size are
    checked before any sample is drawn; the UNet and the VAE run ``batch_size`` samples at a time."""
    if not prompts:
        raise BadArgument("--prompt is required for a text-to-image model (repeat it for several rows)")
    total = num * len(prompts)
    if total > 4096:
        raise BadArgument(f"--num {num} per prompt x {len(prompts)} prompts: at most 4096 images in one grid")
    sampler = prompt_sampler_of(loaded, source=model)
    c, h, w = prompt_image_shape(sampler)
    need = total * c * h * w * 4
    if need > MAX_SAMPLE_BYTES:
        raise BadArgument(f"--num {num}: {total} images of {c}x{h}x{w} take {need / 2**30:.1f} GiB, more than the "
                          f"{MAX_SAMPLE_BYTES / 2**30:.0f} GiB `pd sample` holds; lower --num or the prompts")
    try:  # the grid's size follows from the arguments: refused before any image is sampled
        images.check_display_grid_size(num=total, height=h, width=w, nrow=num, scale=scale)
    except ValueError as err:
        raise BadArgument(f"--num {num}{f' --scale {scale}' if scale else ''}: {err}") from None
    x, caption = prompt_images(loaded, source=model, prompts=prompts, num=num, steps=steps, seed=seed,
                               guidance=guidance, device=device, batch_size=batch_size, sampler=sampler)
    write_atomically(out, images.png_bytes(images.display_grid(x, caption=caption, scale=scale, nrow=num)))
    return (f"wrote {total} samples ({len(prompts)} prompt(s), {steps} step{'' if steps == 1 else 's'}, "
            f"guidance w = {guidance:g}) to {out}")


def _round_keys(store: CheckpointStore, name: str) -> list[str]:
    """The rounds of pipeline ``name`` that have a folder or an in-round state (not ``.eval`` folders), sorted."""
    found = (re.fullmatch(r"(.+/[0-9]{2}-[0-9]{4})(\.state)?", k) for k in store.list(f"pipelines/{name}/rounds"))
    return sorted({m.group(1) for m in found if m is not None and m.group(1).count("/") == 3})


def show_pipeline(name: str, *, storage: str | None) -> str:
    """``pd show``: the pipeline's checkpoints and its quality table, read from the store.

    A round that is corrupt (its files do not verify) is listed as corrupt, one in training as such,
    and the table hides the distilled metrics of every step count whose student is not complete.
    """
    import pandas as pd

    from tasks.common import resolve_config

    cfg = resolve_config(preset="smoke", storage=storage, name=name)
    store = CheckpointStore(cfg.storage.root, storage_options=dict(cfg.storage.storage_options))
    lines = [f"pipeline {name} in {cfg.storage.root}"]
    teacher = jobs.teacher_key(name)
    problem = store.problem(teacher)
    if problem == NOT_SAVED:
        raise FileNotFoundError(f"no pipeline named {name!r} in {cfg.storage.root} (no complete teacher at "
                                f"{store.uri(teacher)}); check --storage and the name `pd run` printed")
    lines.append(f"  teacher      {store.uri(teacher)}" if problem is None else
                 f"  teacher      CORRUPT {store.uri(teacher)}: {problem}")
    invalid_steps: set[int] = set()
    for key in _round_keys(store, name):
        steps = int(key.rsplit("-", 1)[1])
        problem = store.problem(key)
        if problem is None:
            lines.append(f"  {steps:>4d} steps   {store.uri(key)}")
            continue
        invalid_steps.add(steps)
        state = store.read_state_meta(jobs.state_key(key))
        if problem != NOT_SAVED:
            lines.append(f"  {steps:>4d} steps   CORRUPT {store.uri(key)}: {problem}; its metrics are hidden (a rerun "
                         f"retrains it)")
        elif state is not None:
            lines.append(f"  {steps:>4d} steps   not complete (in training, update {state.get('step')}) "
                         f"{store.uri(key)}")
        else:
            lines.append(f"  {steps:>4d} steps   not complete (no manifest: its save did not finish) {store.uri(key)}")
    guided_student = jobs.guided_key(name)
    if store.is_complete(guided_student):
        lines.append(f"  guided       {store.uri(guided_student)}  (stage 1: takes the guidance weight w)")
    report = f"pipelines/{name}/report/quality.csv"
    if store.exists(report):
        from pd_core.metrics.table import summary_view

        df = pd.read_csv(io.BytesIO(store.get_bytes(report)))
        hidden = df["steps"].isin(sorted(invalid_steps))
        distilled = [c for c in df.columns if c.startswith("distilled_")]
        df.loc[hidden, distilled] = float("nan")
        lines += ["", summary_view(df).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
                  f"(all columns: {store.uri(report)})"]
        if hidden.any():
            shown = sorted(int(s) for s in df.loc[hidden, "steps"].unique())  # steps the table has a row for
            lines.append(f"(distilled metrics hidden for {shown} step(s): those students are not "
                         f"complete)")
    else:
        lines.append("  (no quality table yet: the pipeline has not finished its report)")
    return "\n".join(lines)


def _evaluated_model(cfg: Config, *, model: str, storage: str | None,
                     device: torch.device) -> tuple[CheckpointStore, Callable[[], LoadedModel], dict]:
    """(the store the evaluation caches go to, a loader of the model, its manifest) for `pd eval`.

    The cache store is ``--storage`` when given, else the store of the checkpoint's pipeline
    (``<root>`` of ``<root>/pipelines/<name>/...``: its cached feature classifier and reference
    features are reused), else ``storage.root``; caches never go into the checkpoint's folder.
    """
    options = dict(cfg.storage.storage_options)
    config_store = lambda: CheckpointStore(cfg.storage.root, storage_options=options)  # noqa: E731
    if model.startswith(("models:/", "runs:/")):
        from tasks.tracking import load_sampler_from_mlflow

        with tempfile.TemporaryDirectory(prefix="pd-mlflow-model-") as tmp:  # removed once the weights are read
            weights_path, manifest = load_sampler_from_mlflow(model, dst_dir=tmp,
                                                              tracking_uri=cfg.tracking.tracking_uri)
            tensors = load_file(weights_path)
        return config_store(), lambda: model_from_tensors(tensors, manifest, source=model, device=device), manifest
    located = pipeline_location(model)
    root, key = located if located is not None else split_uri(model)
    model_store = CheckpointStore(root, storage_options=options)
    manifest = model_store.read_manifest(key)
    if manifest is None or "sha256" not in manifest:
        raise BadArgument(f"--model {model}: no checkpoint there (no manifest); pass a checkpoint folder as "
                          f"`pd run` prints it")
    cache_store = config_store() if storage or located is None else model_store
    return cache_store, lambda: load_model(model_store, key, device=device), manifest


def evaluate_model_cli(cfg: Config, *, model: str, steps: int | None, sampler: str, gamma: float,
                       storage: str | None = None, guidance: float | None = None) -> str:
    """``pd eval``: one model's metrics with the config's evaluation settings (caches: see _evaluated_model); a
    class-conditional model on class-balanced labels at guidance weight ``guidance`` (default 0)."""
    device = resolve_runtime(cfg.runtime).device
    store, load, manifest = _evaluated_model(cfg, model=model, storage=storage, device=device)
    if manifest.get("diffusers_unet2d_condition") is not None:
        raise BadArgument("pd eval measures pixel-space models; a text-to-image model is measured by `pd run` per step "
                          "count and w (its report, pipelines/<name>/report/quality.csv)")
    size = int((manifest.get("unet") or {}).get("image_size", cfg.data.image_size))
    if size != cfg.data.image_size:
        raise BadArgument(f"--model makes {size}x{size} images but the config's data ({cfg.data.name}) is "
                          f"{cfg.data.image_size}x{cfg.data.image_size}; pass the pipeline's --preset/--config/--set")
    conditional = evaluation.is_conditional(manifest)
    if guidance is not None and not conditional:
        raise BadArgument("--guidance needs a class-conditional model; this one is unconditional")
    steps = steps or int(manifest["steps"])
    schedule = manifest_schedule(manifest)
    if isinstance(schedule, DiscreteSchedule):  # as `pd sample` says it, before any work
        try:
            check_timesteps(steps=steps, num_train_timesteps=schedule.num_timesteps, source=model, field="--steps")
        except ValueError as err:
            raise BadArgument(str(err)) from None
    warn_other_steps(manifest, steps)
    ctx = evaluation.feature_context(cfg, store, device=device)
    record = evaluation.evaluate_model(cfg, store, ctx, load=load, sha256=manifest["sha256"], model_uri=model,
                                       label=sampler, sampler=sampler, steps=steps,
                                       gamma=gamma if sampler == "stochastic" else None, device=device,
                                       w=guidance, conditional=conditional)
    return "\n".join(f"{k:24s} {v}" for k, v in record.items())
