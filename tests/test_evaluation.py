"""pd_core.evaluation: records cached by the weights' sha256 (an imported teacher is not re-measured),
and the GPU-task tags of the flows (tagged only where a concurrency limit can use them)."""

from __future__ import annotations

import pytest
import torch

from pd_core import evaluation, jobs
from pd_core.config import load_config
from pd_core.lineage import teacher_lineage
from pd_core.schedule import COSINE
from pd_core.store import CheckpointStore
from pd_core.unet import UNet, unet_spec
from tasks.common import GPU_TAG, gpu_task_tags


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The smoke preset cut down to 40 samples, a random-init 8x8 U-Net saved at two keys, a store."""
    cfg = load_config(preset="smoke", overrides=["eval.num_samples=40", "eval.kid_subset_size=20",
                                                 "eval.kid_subsets=2", "eval.classifier_epochs=1"])
    store = CheckpointStore(str(tmp_path_factory.mktemp("store")))
    spec = unet_spec(cfg, in_channels=1, dropout=0.0)
    torch.manual_seed(0)
    # Perturbed: the output layer starts at zero, which would make every sample the same image.
    tensors = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in UNet(spec).state_dict().items()}
    for name in ("a", "b"):
        named = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"name": name})})
        manifest = jobs._manifest(named, kind="teacher", spec=spec, steps=8, round_index=0,
                                  lineage_=teacher_lineage(named), schedule=COSINE)
        store.save_checkpoint(jobs.teacher_key(name), tensors=tensors, manifest=manifest)
    ctx = evaluation.feature_context(cfg, store)
    return cfg, store, ctx


def test_same_weights_under_another_key_reuse_the_record(tiny, monkeypatch):
    cfg, store, ctx = tiny
    first = evaluation.evaluate_checkpoint(cfg, store, ctx, key="pipelines/a/teacher", label="teacher_ddim",
                                           sampler="ddim", steps=2)
    assert first["n_samples"] == 40 and first["fd_digits"] > 0
    assert first["model_uri"] == store.uri("pipelines/a/teacher")

    def must_not_run(*args, **kwargs):
        raise AssertionError("re-measured weights that were already measured")

    monkeypatch.setattr(evaluation, "evaluate_sampler", must_not_run)
    again = evaluation.evaluate_checkpoint(cfg, store, ctx, key="pipelines/b/teacher", label="teacher_ddim",
                                           sampler="ddim", steps=2)
    assert again["model_uri"] == store.uri("pipelines/b/teacher")  # the record names the checkpoint asked about
    assert {k: v for k, v in again.items() if k != "model_uri"} == {k: v for k, v in first.items() if k != "model_uri"}
    sha = store.read_manifest("pipelines/a/teacher")["sha256"]
    assert store.list(f"evals/{sha[:16]}") == [f"evals/{sha[:16]}/ddim-0002-{evaluation.eval_hash(cfg)}.json"]


def test_other_eval_settings_or_steps_are_measured_anew(tiny):
    cfg, store, ctx = tiny
    base = evaluation.evaluate_checkpoint(cfg, store, ctx, key="pipelines/a/teacher", label="teacher_ddim",
                                          sampler="ddim", steps=1)
    other_seed = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"seed": cfg.eval.seed + 1})})
    reseeded = evaluation.evaluate_checkpoint(other_seed, store, ctx, key="pipelines/a/teacher",
                                              label="teacher_ddim", sampler="ddim", steps=1)
    assert reseeded["fd_digits"] != base["fd_digits"]  # other noise: a new measurement, not the cached one


def test_evaluating_a_missing_checkpoint_names_it(tiny):
    cfg, store, ctx = tiny
    with pytest.raises(FileNotFoundError, match="pipelines/nope/teacher"):
        evaluation.evaluate_checkpoint(cfg, store, ctx, key="pipelines/nope/teacher", label="teacher_ddim",
                                       sampler="ddim", steps=1)


def test_gpu_tasks_are_tagged_only_where_a_limit_can_hold_them():
    # The embedded temporary server belongs to one process: no tag limit there coordinates anything.
    assert gpu_task_tags(None, api_url=None) == []
    assert gpu_task_tags(None, api_url="http://prefect:4200/api") == [GPU_TAG] == ["gpu"]
    assert gpu_task_tags(["a100"], api_url=None) == ["a100"]  # explicit tags always win
    assert gpu_task_tags([], api_url="http://prefect:4200/api") == []


def test_grids_hold_the_evaluation_samples_raw_and_readable(tiny):
    import numpy as np

    from pd_core import images
    from pd_core.metrics import sample_noise
    from pd_core.models import load_model

    cfg, store, _ = tiny
    key = "pipelines/a/teacher"
    uri = evaluation.write_grid(cfg, store, key=key, sampler="ddim", steps=2)
    assert uri == store.uri(evaluation.display_grid_key(key, sampler="ddim", steps=2))
    # The same samples, recomputed here: the evaluation's first grid_size**2 noise draws, 2 DDIM steps.
    model = load_model(store, key)
    n = cfg.eval.grid_size ** 2
    noise = sample_noise(seed=cfg.eval.seed, start=0, count=n, shape=(1, 8, 8))
    x = evaluation.make_sample_fn(model, sampler="ddim", steps=2, gamma=None, seed=cfg.eval.seed,
                                  device=torch.device("cpu"))(noise)
    raw = images.read_png(store.uri(evaluation.grid_key(key, sampler="ddim", steps=2))).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(raw, images.make_grid(x, nrow=cfg.eval.grid_size))  # native pixels, as before
    shown = images.read_png(uri).permute(1, 2, 0).numpy()
    caption = images.grid_caption(pipeline="smoke", manifest=model.manifest, sampler="ddim", steps=2)
    assert caption == "smoke | teacher | 2 steps | DDIM"
    np.testing.assert_array_equal(shown, images.display_grid(x, caption=caption, nrow=cfg.eval.grid_size))
    assert shown.shape[1] >= images.DISPLAY_MIN_WIDTH


def test_a_checkpoint_retrained_at_the_same_key_gets_new_grids_and_unchanged_weights_keep_theirs(tiny):
    cfg, store, _ = tiny
    key = "pipelines/regrid/teacher"
    weights, manifest = store.load_checkpoint("pipelines/a/teacher")
    fields = {k: v for k, v in manifest.items() if k not in ("format", "sha256", "files", "status", "created_at")}
    store.save_checkpoint(key, tensors=weights, manifest=fields)
    raw = evaluation.grid_key(key, sampler="ddim", steps=2)
    evaluation.write_grid(cfg, store, key=key, sampler="ddim", steps=2)
    first = store.get_bytes(raw)
    store.put_bytes(raw, b"not rewritten")  # same weights: the grid is kept, not sampled again
    evaluation.write_grid(cfg, store, key=key, sampler="ddim", steps=2)
    assert store.get_bytes(raw) == b"not rewritten"
    retrained = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()}
    ref = store.save_checkpoint(key, tensors=retrained, manifest=fields)  # e.g. pd run --restart-from
    evaluation.write_grid(cfg, store, key=key, sampler="ddim", steps=2)
    assert store.get_bytes(raw) not in (b"not rewritten", first)
    assert store.get_bytes(f"{raw}.sha256").decode() == ref.sha256


def test_grid_captions_name_pipeline_round_steps_and_sampler():
    from pd_core import images

    student = {"kind": "student", "round": 3, "teacher_steps": 2, "steps": 1}
    assert images.grid_caption(pipeline="smoke", manifest=student, sampler="ddim", steps=1) == \
        "smoke | round 3 (2->1) | 1 step | DDIM"
    assert images.grid_caption(pipeline="p", manifest={"kind": "teacher"}, sampler="stochastic", steps=8) == \
        "p | teacher | 8 steps | stochastic"
    assert images.grid_caption(pipeline="p", manifest={"kind": "student", "round": 2}, sampler="ddim", steps=2) == \
        "p | round 2 | 2 steps | DDIM"
    assert images.grid_caption(pipeline="p", manifest={}, sampler="heun", steps=1) == "p | model | 1 step | heun"


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """smoke-guided cut down to 40 samples: a perturbed class-conditional teacher (null class) and a perturbed
    w-conditioned student, saved in a store."""
    import dataclasses

    cfg = load_config(preset="smoke-guided", overrides=["eval.num_samples=40", "eval.kid_subset_size=20",
                                                        "eval.kid_subsets=2", "eval.classifier_epochs=1"])
    store = CheckpointStore(str(tmp_path_factory.mktemp("store")))
    spec = unet_spec(cfg, in_channels=1, num_classes=10, dropout=0.0)
    torch.manual_seed(1)
    for kind, key, s in (("teacher", jobs.teacher_key("c"), spec),
                         ("guided_student", jobs.guided_key("c"), dataclasses.replace(spec, guidance_embedding=True))):
        tensors = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in UNet(s).state_dict().items()}
        manifest = jobs._manifest(cfg, kind=kind, spec=s, steps=8, round_index=0, lineage_=teacher_lineage(cfg),
                                  schedule=COSINE)
        store.save_checkpoint(key, tensors=tensors, manifest=manifest)
    return cfg, store, evaluation.feature_context(cfg, store)


def test_a_conditional_model_is_measured_per_guidance_weight_with_its_sample_accuracy(conditional):
    from pd_core import samplers
    from pd_core.guidance import GuidedDenoiser, class_balanced_labels
    from pd_core.metrics import sample_noise
    from pd_core.models import load_model

    cfg, store, ctx = conditional
    key = jobs.teacher_key("c")
    at0, at2 = (evaluation.evaluate_checkpoint(cfg, store, ctx, key=key, label="teacher_ddim", sampler="ddim",
                                               steps=2, w=w) for w in (0.0, 2.0))
    assert (at0["w"], at2["w"]) == (0.0, 2.0) and at0["fd_digits"] != at2["fd_digits"]
    sha = store.read_manifest(key)["sha256"][:16]
    assert sorted(k.rsplit("/", 1)[1].rsplit("-", 1)[0] for k in store.list(f"evals/{sha}")) == [
        "ddim-0002-w0", "ddim-0002-w2"]
    # the accuracy, recomputed here: class i mod 10 for noise i, the guided teacher's 2-step DDIM, the classifier
    model = load_model(store, key)
    labels = class_balanced_labels(start=0, count=40, num_classes=10)
    fn = GuidedDenoiser(model.denoiser, y=labels, w=2.0, null_label=10)
    x = samplers.ddim(fn, sample_noise(seed=cfg.eval.seed, start=0, count=40, shape=(1, 8, 8)), num_steps=2)
    predicted = ctx.classifier.predict(torch.floor((x + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8))
    assert at2["sample_accuracy"] == pytest.approx(float((predicted == labels).double().mean()), abs=1e-12)


def test_which_weights_each_checkpoint_is_measured_at(conditional, tiny):
    cfg, store, _ = conditional
    teacher, guided = (store.read_manifest(k) for k in (jobs.teacher_key("c"), jobs.guided_key("c")))
    assert evaluation.evaluation_weights(cfg, teacher) == [0.0, 1.0]
    assert evaluation.evaluation_weights(cfg, guided) == [0.0, 1.0]
    student = {**teacher, "kind": "student"}  # a distilled conditional student without the w input: w = 0 only
    assert evaluation.evaluation_weights(cfg, student) == [0.0]
    plain_cfg, plain_store, plain_ctx = tiny
    assert evaluation.evaluation_weights(plain_cfg, plain_store.read_manifest("pipelines/a/teacher")) == [None]
    with pytest.raises(ValueError, match="not class-conditional"):
        evaluation.evaluate_checkpoint(plain_cfg, plain_store, plain_ctx, key="pipelines/a/teacher",
                                       label="teacher_ddim", sampler="ddim", steps=1, w=1.0)


def test_a_conditional_grid_has_one_row_per_class(conditional):
    import io

    from PIL import Image

    cfg, store, _ = conditional
    uri = evaluation.write_grid(cfg, store, key=jobs.guided_key("c"), sampler="ddim", steps=2, w=1.0)
    assert uri.endswith("samples-ddim-0002-w1.png")  # the display grid (captioned, upscaled); the raw one next to it
    png = Image.open(io.BytesIO(store.get_bytes(f"{jobs.guided_key('c')}.eval/grid-ddim-0002-w1.png")))
    assert png.size == (4 * 10 + 2, 10 * 10 + 2)  # grid_size 4 columns, 10 class rows of 8x8 images, 2-px padding


@pytest.mark.slow
def test_compiled_conditional_sampling_matches_eager_and_compiles_once_for_every_batch_of_labels(conditional):
    """eval.compile: the guided teacher's denoiser is compiled for the first batch and reused (dynamo's guards
    pass) for the next batches' labels; the images are the eager ones."""
    from torch._dynamo.utils import counters

    from pd_core.metrics import sample_noise
    from pd_core.models import load_model

    cfg, store, _ = conditional
    model = load_model(store, jobs.teacher_key("c"))
    noise = sample_noise(seed=cfg.eval.seed, start=0, count=60, shape=(1, 8, 8))
    kwargs = dict(sampler="ddim", steps=2, gamma=None, seed=0, device=torch.device("cpu"), w=1.5)
    eager = evaluation.make_sample_fn(model, **kwargs)
    torch._dynamo.reset()
    compiled = evaluation.make_sample_fn(model, compile=True, **kwargs)
    frames = []
    for batch in noise.split(20):  # three batches, classes 0..9, 0..9 in turn
        torch.testing.assert_close(compiled(batch), eager(batch), rtol=1e-4, atol=1e-4)
        frames.append(counters["frames"]["ok"])
    assert frames[0] >= 1 and frames[1] == frames[0] and frames[2] == frames[0]
