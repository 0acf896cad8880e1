"""A text-to-image pipeline's evaluation samplers: ``diffusers_ddim`` is stock StableDiffusionPipeline with the folder's
own scheduler settings (leading spacing, steps_offset: not our trailing grid), ``teacher_ddim`` our trailing DDIM; the
UNet calls each makes; prompts and the records' accuracy.
"""

from __future__ import annotations

import pytest
import torch

from pd_core.interop.sd_pipeline import read_text_to_image_model, teacher_checkpoint
from pd_core.store import CheckpointStore
from pd_core.text_evaluation import eval_prompts, prompt_sampler, sample_images, unet_calls
from tests.sd_models import load_sd_pipeline, one_thread, tiny_pipeline

PROMPTS = ["a photo of a bag", "a photo of a coat"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def leading(tmp_path_factory):
    """A tiny pipeline whose DDIMScheduler ships SD 1.x's leading spacing with steps_offset 1; its teacher stored."""
    import diffusers

    root = tmp_path_factory.mktemp("leading")
    pipe = tiny_pipeline(root / "build")
    pipe.scheduler = diffusers.DDIMScheduler.from_config({**pipe.scheduler.config, "timestep_spacing": "leading",
                                                          "steps_offset": 1, "set_alpha_to_one": False})
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    model = read_text_to_image_model(str(root / "pipe"))
    tensors, fields = teacher_checkpoint(model)
    store = CheckpointStore(str(root / "store"))
    store.save_checkpoint("t", tensors=tensors, manifest={"kind": "teacher", "steps": 4, **fields})
    return root / "pipe", store


def _cfg(folder, tmp_path):
    from pd_core.config import load_config

    return load_config(preset="smoke", overrides=[f"pipeline.teacher_uri=diffusers:{folder}", "data.name=captions",
                                                  f"data.url={tmp_path}", f"storage.root={tmp_path / 's'}",
                                                  "eval.class_names=[bag, coat]"])


@torch.no_grad()
@pytest.mark.parametrize("steps", [4])
def test_diffusers_ddim_is_stock_stable_diffusion_with_the_folders_leading_spacing(leading, tmp_path, steps):
    folder, store = leading
    sampler = prompt_sampler(_cfg(folder, tmp_path), store, "t")
    scheduler = read_text_to_image_model(str(folder)).configs["scheduler"]
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(steps))
    ours = sample_images(sampler, kind="diffusers_ddim", prompts=PROMPTS, noise=z, steps=steps, w=2.0,
                         scheduler_config=scheduler)
    stock = load_sd_pipeline(folder)(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=3.0,
                                     output_type="pt").images  # (x / 2 + 1 / 2).clamp(0, 1)
    torch.testing.assert_close(ours, stock * 2 - 1, rtol=0, atol=1e-5)
    trailing = sample_images(sampler, kind="teacher_ddim", prompts=PROMPTS, noise=z, steps=steps, w=2.0)
    assert float((trailing - ours).abs().max()) > 1e-4  # our trailing grid is another sampler, reported apart


def test_unet_calls_count_two_a_step_for_the_guided_teacher_only():
    assert unet_calls(sampler="teacher_ddim", steps=4, w=2.0) == 8
    assert unet_calls(sampler="diffusers_ddim", steps=4, w=0.0) == 4  # guidance_scale 1: one call
    assert unet_calls(sampler="distilled", steps=4, w=2.0, student_takes_w=True) == 4


def test_evaluation_prompts_are_class_balanced_in_the_order_of_the_noise(leading, tmp_path):
    cfg = _cfg(leading[0], tmp_path)
    assert eval_prompts(cfg, start=3, count=3) == ["a photo of a coat", "a photo of a bag", "a photo of a coat"]


def test_the_text_to_image_preset_prompts_name_the_benchmarks_classes_as_its_captions_do():
    from pd_core.config import load_config
    from pd_core.data.class_captions import FASHION_MNIST_NAMES, TEMPLATE

    cfg = load_config(preset="text-to-image-cpu")
    assert tuple(cfg.eval.class_names) == FASHION_MNIST_NAMES and cfg.eval.prompt_template == TEMPLATE
    assert cfg.data.name == "captions" and cfg.guidance.enabled
    assert [tuple(r) for r in cfg.distill.rounds()] == [(8, 4), (4, 2), (2, 1)]


def test_a_vae_replaced_in_the_teacher_folder_is_read_anew_and_keys_new_records_and_grids(leading, tmp_path):
    """Same UNet, another VAE at the same location: the folder is read again (no stale in-process copy), the grid is
    redrawn through the new decoder and the records' cache key changes with the folder's hash."""
    import shutil

    from pd_core.evaluation import grid_key
    from pd_core.text_evaluation import teacher_folder, text_record_key, write_text_grid
    from tests.sd_models import tiny_vae

    folder = tmp_path / "pipe"
    shutil.copytree(leading[0], folder)
    tensors, fields = teacher_checkpoint(read_text_to_image_model(str(folder)))
    store = CheckpointStore(str(tmp_path / "store"))
    store.save_checkpoint("t", tensors=tensors, manifest={"kind": "teacher", "steps": 4, **fields})
    cfg = _cfg(folder, tmp_path)
    before = teacher_folder(cfg)
    write_text_grid(cfg, store, key="t", steps=1, w=0.0)
    grid_before = store.get_bytes(grid_key("t", sampler="ddim", steps=1, w=0.0))
    tiny_vae(seed=7).save_pretrained(str(folder / "vae"), safe_serialization=True)
    after = teacher_folder(cfg)
    assert after.source_sha256 != before.source_sha256
    assert not all(torch.equal(after.weights["vae"][k], before.weights["vae"][k]) for k in after.weights["vae"])
    write_text_grid(cfg, store, key="t", steps=1, w=0.0)
    assert store.get_bytes(grid_key("t", sampler="ddim", steps=1, w=0.0)) != grid_before
    keys = {text_record_key(model_sha256="ab" * 32, folder_sha256=m.source_sha256, kind="teacher_ddim", steps=4, w=0.0,
                            eval_hash_="e") for m in (before, after)}
    assert len(keys) == 2


@torch.no_grad()
def test_the_ddim_baseline_of_an_euler_folder_never_clips_latents_unless_the_config_says_so(tmp_path):
    """An Euler config has no clip_sample: ``DDIMScheduler.from_config`` would clip x_hat to [-1, 1] (a pixel rule)
    in latent space; the baseline is stock StableDiffusionPipeline with that DDIM and clip_sample False."""
    import diffusers

    pipe = tiny_pipeline(tmp_path / "build")
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        {k: v for k, v in pipe.scheduler.config.items() if k not in ("clip_sample", "clip_sample_range")})
    pipe.save_pretrained(str(tmp_path / "pipe"), safe_serialization=True)
    model = read_text_to_image_model(str(tmp_path / "pipe"))
    config = model.configs["scheduler"]
    assert "clip_sample" not in config and diffusers.DDIMScheduler.from_config(config).config.clip_sample
    tensors, fields = teacher_checkpoint(model)
    store = CheckpointStore(str(tmp_path / "store"))
    store.save_checkpoint("t", tensors=tensors, manifest={"kind": "teacher", "steps": 4, **fields})
    sampler = prompt_sampler(_cfg(tmp_path / "pipe", tmp_path), store, "t")
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = sample_images(sampler, kind="diffusers_ddim", prompts=PROMPTS, noise=z, steps=4, w=2.0,
                         scheduler_config=config)
    stock = load_sd_pipeline(tmp_path / "pipe")
    outputs = {}
    for clip in (False, True):
        stock.scheduler = diffusers.DDIMScheduler.from_config(stock.scheduler.config, clip_sample=clip)
        outputs[clip] = stock(PROMPTS, latents=z.clone(), num_inference_steps=4, guidance_scale=3.0,
                              output_type="pt").images * 2 - 1
    torch.testing.assert_close(ours, outputs[False], rtol=0, atol=1e-5)
    assert float((outputs[True] - outputs[False]).abs().max()) > 1e-3  # clipping the latents would show
    from pd_core.text_evaluation import baseline_ddim_config

    assert baseline_ddim_config(config)[1] == "latent default"
    assert baseline_ddim_config({**config, "clip_sample": True}) == ({**config, "clip_sample": True}, "folder")


def test_prompt_accuracy_is_the_fraction_of_samples_the_classifier_puts_in_the_prompts_class(leading, tmp_path):
    """Against an independent count on the same noise and prompts; the classifier's head has one output per class
    name, a class no image shows included."""
    from pd_core.config import load_config
    from pd_core.data.class_captions import write_caption_folder
    from pd_core.images import to_uint8
    from pd_core.metrics.evaluate import sample_noise
    from pd_core.text_evaluation import evaluate_text_checkpoint, text_feature_context

    folder, store = leading
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    write_caption_folder(images, ["a photo of a bag", "a photo of a coat", ""] * 2, str(tmp_path / "data"))
    cfg = load_config(preset="smoke", overrides=[
        f"pipeline.teacher_uri=diffusers:{folder}", "data.name=captions", f"data.url={tmp_path / 'data'}",
        "data.image_size=8", f"storage.root={tmp_path / 's'}", "eval.class_names=[bag, coat, shoe]",
        "eval.num_samples=6", "eval.batch_size=6", "eval.kid_subset_size=3", "eval.kid_subsets=2",
        "eval.classifier_epochs=1"])
    ctx = text_feature_context(cfg, store)
    assert ctx.classifier.model.arch["num_classes"] == 3
    record = evaluate_text_checkpoint(cfg, store, ctx, key="t", kind="teacher_ddim", steps=2, w=0.0)
    noise = sample_noise(seed=cfg.eval.seed, start=0, count=6, shape=(4, 4, 4))
    expected = torch.arange(6) % 3
    prompts = [f"a photo of a {['bag', 'coat', 'shoe'][int(c)]}" for c in expected]
    with torch.no_grad():
        x = sample_images(prompt_sampler(cfg, store, "t"), kind="teacher_ddim", prompts=prompts, noise=noise, steps=2,
                          w=0.0)
        want = float((ctx.classifier.predict(to_uint8(x.float())) == expected).double().mean())
    assert record["prompt_accuracy"] == pytest.approx(want, abs=1e-12)
