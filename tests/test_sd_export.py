"""A guided text-to-image student exported as a StableDiffusionPipeline folder: stock diffusers loads it, calls the
UNet once per step, and its latents equal our N-step sampler's on the same latents and prompts.

The student is the tiny teacher's UNet with a guidance embedding whose weights are set at random (so w matters):
what is checked is that the folder is our sampler, not what a trained student looks like.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pd_core import samplers
from pd_core.denoiser import Denoiser
from pd_core.export.files import ExportError
from pd_core.export.to_sd_pipeline import SAMPLER_FILE, export_text_to_image, usage_line
from pd_core.interop.sd_folder import read_text_to_image
from pd_core.interop.sd_pipeline import build_text_encoder, build_tokenizer, encode_prompts, read_text_to_image_model
from pd_core.interop.sd_unet import TextUNetNet, build_cond_unet, guided_student_unet
from pd_core.text_guidance import student_denoiser
from tests.sd_models import load_sd_pipeline, one_thread, saved_sd_pipeline


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


def random_student(teacher_unet, *, seed: int):
    student = guided_student_unet(teacher_unet, dim=16)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return student


@pytest.mark.parametrize("kind", ["v", "eps"])
@torch.no_grad()
def test_an_exported_guided_student_is_a_stock_pipeline_that_equals_our_sampler(tmp_path, kind):
    teacher = read_text_to_image_model(f"diffusers:{saved_sd_pipeline()}")
    student = random_student(build_cond_unet(teacher.configs["unet"], teacher.weights["unet"]), seed=1).double()
    out = export_text_to_image(student_unet=student, parameterization=kind, teacher=teacher, steps=4,
                               out=str(tmp_path / "student"), source={"round": 2})
    assert next(student.parameters()).dtype == torch.float64  # the caller's module is left as it was
    doc = json.loads((out / SAMPLER_FILE).read_text())
    assert (doc["steps"], doc["prediction_type"], doc["time_cond_proj_dim"]) == (4, PREDICTION[kind], 16)
    assert doc["teacher"]["sha256"] == teacher.source_sha256
    assert read_text_to_image(str(out)).parameterization == kind  # our own import accepts it back

    pipe = load_sd_pipeline(out).to(torch.float64)
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    tokenizer, encoder = build_tokenizer(teacher), build_text_encoder(teacher).double()
    context = encode_prompts(tokenizer, encoder, PROMPTS)
    ours_net = TextUNetNet(student.double(), schedule=teacher.schedule)
    for steps in (1, 2, 4):
        for w in (0.0, 3.0):
            z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
            calls.clear()
            ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=1.0 + w,
                       output_type="latent").images
            assert calls == [2] * steps  # one UNet call per step, on the batch alone
            denoiser = student_denoiser(Denoiser(ours_net, parameterization=kind), context=context, w=w)
            ours = samplers.ddim(denoiser, z, num_steps=steps, clip=False, schedule=teacher.schedule)
            assert float((ref - z).abs().max()) > 1e-2
            np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-4, err_msg=f"N={steps} w={w}")
    assert "num_inference_steps=4, guidance_scale=4" in usage_line(out=out, steps=4, w=3.0)


def test_an_export_refuses_a_step_count_diffusers_would_round_and_an_existing_folder(tmp_path):
    teacher = read_text_to_image_model(f"diffusers:{saved_sd_pipeline()}")
    student = random_student(build_cond_unet(teacher.configs["unet"], teacher.weights["unet"]), seed=2)
    with pytest.raises(ExportError, match="--steps 16 does not divide the scheduler's 1000 timesteps"):
        export_text_to_image(student_unet=student, parameterization="v", teacher=teacher, steps=16,
                             out=str(tmp_path / "a"))
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "b").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_text_to_image(student_unet=student, parameterization="v", teacher=teacher, steps=4,
                             out=str(tmp_path / "b"))


@torch.no_grad()
def test_a_student_of_an_sd1_style_folder_exports_with_the_overrides_that_make_it_our_sampler(tmp_path):
    """SD 1.x ships PNDMScheduler with leading spacing, steps_offset 1, set_alpha_to_one False and no clip_sample:
    every one of those must be overridden (trailing, alpha = 1 at the end, no clipping) or stock diffusers would run
    another sampler than the student was distilled for."""
    import diffusers

    from tests.sd_models import tiny_pipeline

    pipe = tiny_pipeline(tmp_path / "build")
    config = {k: v for k, v in pipe.scheduler.config.items() if k not in ("clip_sample", "clip_sample_range")}
    pipe.scheduler = diffusers.PNDMScheduler.from_config({**config, "timestep_spacing": "leading", "steps_offset": 1,
                                                          "set_alpha_to_one": False, "skip_prk_steps": True})
    pipe.save_pretrained(str(tmp_path / "sd1"), safe_serialization=True)
    teacher = read_text_to_image_model(f"diffusers:{tmp_path / 'sd1'}")
    assert "clip_sample" not in teacher.configs["scheduler"] and not teacher.configs["scheduler"]["set_alpha_to_one"]
    student = random_student(build_cond_unet(teacher.configs["unet"], teacher.weights["unet"]), seed=3).double()
    out = export_text_to_image(student_unet=student, parameterization="v", teacher=teacher, steps=2,
                               out=str(tmp_path / "student"))
    stock = load_sd_pipeline(out).to(torch.float64)
    c = stock.scheduler.config
    assert type(stock.scheduler).__name__ == "DDIMScheduler"
    assert (c.timestep_spacing, c.set_alpha_to_one, c.clip_sample, c.prediction_type) == \
           ("trailing", True, False, "v_prediction")
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = stock(PROMPTS, latents=z.clone(), num_inference_steps=2, guidance_scale=4.0, output_type="latent").images
    context = encode_prompts(build_tokenizer(teacher), build_text_encoder(teacher).double(), PROMPTS)
    denoiser = student_denoiser(Denoiser(TextUNetNet(student, schedule=teacher.schedule), parameterization="v"),
                                context=context, w=3.0)
    ours = samplers.ddim(denoiser, z, num_steps=2, clip=False, schedule=teacher.schedule)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-4)
    leading = diffusers.DDIMScheduler.from_config({**c, "timestep_spacing": "leading", "steps_offset": 1,
                                                   "set_alpha_to_one": False})
    stock.scheduler = leading  # the folder's own settings would be another sampler
    other = stock(PROMPTS, latents=z.clone(), num_inference_steps=2, guidance_scale=4.0, output_type="latent").images
    assert float((other - ref).abs().max()) > 1e-3


def test_the_model_card_shows_a_guidance_weight_inside_the_students_trained_range(tmp_path):
    from pd_core.export.to_sd_pipeline import CARD_FILE, example_w

    assert example_w({"w_min": 0.0, "w_max": 1.0}) == 1.0 and example_w({"w_min": 3.0, "w_max": 5.0}) == 3.0
    assert example_w({"w_min": 0.0, "w_max": 4.0}) == 2.0 and example_w({}) == 2.0
    teacher = read_text_to_image_model(f"diffusers:{saved_sd_pipeline()}")
    student = random_student(build_cond_unet(teacher.configs["unet"], teacher.weights["unet"]), seed=4)
    out = export_text_to_image(student_unet=student, parameterization="v", teacher=teacher, steps=2,
                               out=str(tmp_path / "student"), w=example_w({"w_min": 0.0, "w_max": 1.0}))
    card = (out / CARD_FILE).read_text()
    assert card.count("guidance_scale=2)") == 2 and "guidance_scale=3" not in card  # the example and the call
