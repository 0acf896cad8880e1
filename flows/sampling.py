"""CLI helpers outside the pipeline flow: sample a model into a grid, evaluate one model, show a pipeline."""

from __future__ import annotations

import io
import logging
import os
import time

import torch

from pd_core import images, jobs, samplers
from pd_core.guidance import guided
from pd_core.models import LoadedModel, load_model_uri, model_from_files, split_uri
from pd_core.store import CheckpointStore
from pd_core.train import resolve_device, resolve_runtime
from tasks.env import prepare_environment

log = logging.getLogger("pd_core.sampling")


def default_tracking_uri() -> str:
    """Where `pd run` tracks by default: $MLFLOW_TRACKING_URI, else the project's sqlite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{prepare_environment() / 'mlflow.db'}"


def load_any_model(model: str, *, device: torch.device, tracking_uri: str | None = None) -> LoadedModel:
    """A checkpoint folder URI (file://, s3://, a path) or an MLflow model URI (models:/..., runs:/...)."""
    if model.startswith(("models:/", "runs:/")):
        from tasks.tracking import load_sampler_from_mlflow

        weights_path, manifest = load_sampler_from_mlflow(model, tracking_uri=tracking_uri or default_tracking_uri())
        return model_from_files(weights_path=weights_path, manifest=manifest, device=device)
    return load_model_uri(model, device=device)


def sample_labels(loaded: LoadedModel, *, num: int, label: int | None, guidance: float | None) -> torch.Tensor | None:
    """The class of each image for a class-conditional model (``label``, else image i asks for class i mod K);
    None for an unconditional one, which refuses ``--label`` and ``--guidance``."""
    spec = loaded.denoiser.net.spec
    if spec.num_classes < 1:
        if label is not None or guidance is not None:
            raise ValueError("--label and --guidance need a class-conditional model; this one is unconditional")
        return None
    if label is not None and not 0 <= label < spec.num_classes:
        raise ValueError(f"--label must be a class in [0, {spec.num_classes - 1}]; got {label}")
    if label is not None:
        return torch.full((num,), label, dtype=torch.long)
    return torch.arange(num, dtype=torch.long) % spec.num_classes


def sample_images(loaded: LoadedModel, *, steps: int, num: int, sampler: str, gamma: float, seed: int,
                  batch_size: int, device: torch.device, labels: torch.Tensor | None = None,
                  guidance: float = 0.0) -> torch.Tensor:
    """Draw ``num`` images in batches from noise seeded by ``seed``; returns (num, C, H, W) in [-1, 1] on CPU.

    ``labels`` (num,): the classes a class-conditional model samples, at guidance weight ``guidance``.
    """
    spec = loaded.denoiser.net.spec
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    with torch.inference_mode():
        for start in range(0, num, batch_size):
            b = min(batch_size, num - start)
            z = torch.randn((b, spec.in_channels, spec.image_size, spec.image_size), generator=gen).to(device)
            denoiser = loaded.denoiser
            if labels is not None:
                denoiser = guided(denoiser, spec=spec, y=labels[start:start + b].to(device), w=guidance)
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


MAX_SAMPLES = 100_000  # --num: bounded like every input


def sample_to_grid(*, model: str, steps: int | None, num: int, out: str, sampler: str, gamma: float, seed: int,
                   batch_size: int, device: str, throughput: bool, tracking_uri: str | None = None,
                   label: int | None = None, guidance: float | None = None) -> str:
    """``pd sample``: write a PNG grid of ``num`` samples; return a one-line summary.

    A class-conditional model samples class ``label`` (default: image i asks for class i mod K, so with
    K columns each column is one class) at guidance weight ``guidance`` (default 0).
    """
    prepare_environment()
    if not 1 <= num <= MAX_SAMPLES:
        raise ValueError(f"--num must be in [1, {MAX_SAMPLES}]; got {num}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1; got {steps}")
    if guidance is not None and not 0.0 <= guidance <= 100.0:
        raise ValueError(f"--guidance must be a weight in [0, 100]; got {guidance}")
    try:
        dev = resolve_device(device)
    except ValueError:
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu") from None
    loaded = load_any_model(model, device=dev, tracking_uri=tracking_uri)
    steps = steps or loaded.steps
    labels = sample_labels(loaded, num=num, label=label, guidance=guidance)
    t0 = time.perf_counter()
    x = sample_images(loaded, steps=steps, num=num, sampler=sampler, gamma=gamma, seed=seed, batch_size=batch_size,
                      device=dev, labels=labels, guidance=guidance or 0.0)
    seconds = time.perf_counter() - t0
    nrow = loaded.denoiser.net.spec.num_classes if labels is not None and label is None else None
    images.write_grid(x, out, nrow=nrow)
    what = "" if labels is None else f", {'class ' + str(label) if label is not None else 'every class'}, " \
                                     f"guidance w = {guidance or 0.0:g}"
    line = f"wrote {num} samples ({sampler}, {steps} steps{what}) to {out}"
    if throughput:
        line += f"; {num / seconds:.1f} images/s ({seconds / num * 1e3:.2f} ms/image on {dev.type})"
    return line


def show_pipeline(name: str, *, storage: str | None) -> str:
    """``pd show``: the pipeline's checkpoints and its quality table, read from the store."""
    import pandas as pd

    from tasks.common import resolve_config

    cfg = resolve_config(preset="smoke", storage=storage, name=name)
    store = CheckpointStore(cfg.storage.root, storage_options=dict(cfg.storage.storage_options))
    lines = [f"pipeline {name} in {cfg.storage.root}"]
    teacher = jobs.teacher_key(name)
    if not store.is_complete(teacher):
        raise FileNotFoundError(f"no pipeline named {name!r} in {cfg.storage.root} (no complete teacher at "
                                f"{store.uri(teacher)}); check --storage and the name `pd run` printed")
    lines.append(f"  teacher      {store.uri(teacher)}")
    guided_student = jobs.guided_key(name)
    if store.is_complete(guided_student):
        lines.append(f"  guided       {store.uri(guided_student)}  (stage 1: takes the guidance weight w)")
    rounds = [k for k in store.list(f"pipelines/{name}/rounds") if k.count("/") == 3 and "." not in k.rsplit("/", 1)[1]]
    for key in sorted(rounds):
        if store.is_complete(key):
            manifest = store.read_manifest(key)
            lines.append(f"  {manifest['steps']:>4d} steps   {store.uri(key)}")
    report = f"pipelines/{name}/report/quality.csv"
    if store.exists(report):
        from pd_core.metrics.table import summary_view

        df = pd.read_csv(io.BytesIO(store.get_bytes(report)))
        lines += ["", summary_view(df).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
                  f"(all columns: {store.uri(report)})"]
    else:
        lines.append("  (no quality table yet: the pipeline has not finished its report)")
    return "\n".join(lines)


def evaluate_model_cli(cfg, *, model: str, steps: int | None, sampler: str, gamma: float,
                       guidance: float | None = None) -> str:
    """``pd eval``: one checkpoint's metrics with the config's evaluation settings (features cached in the store)."""
    from pd_core import evaluation

    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1; got {steps}")
    root, key = split_uri(model)
    model_store = CheckpointStore(root, storage_options=dict(cfg.storage.storage_options))
    manifest = model_store.read_manifest(key)
    if manifest is None:
        raise FileNotFoundError(f"no checkpoint at {model} (no manifest); "
                                f"pass a checkpoint folder as `pd run` prints it")
    device = resolve_runtime(cfg.runtime).device
    ctx = evaluation.feature_context(cfg, model_store, device=device)
    record = evaluation.evaluate_checkpoint(cfg, model_store, ctx, key=key, label=f"{sampler}", sampler=sampler,
                                            steps=steps or int(manifest["steps"]),
                                            gamma=gamma if sampler == "stochastic" else None, device=device,
                                            w=guidance)
    return "\n".join(f"{k:24s} {v}" for k, v in record.items())
