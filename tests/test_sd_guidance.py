"""Guidance of a text-conditioned latent teacher: the guidance embedding is StableDiffusionPipeline's, the stage-1
target matches a float64 reference, the zero-initialised student is the teacher, and our classifier-free-guided
DDIM over the imported teacher is stock StableDiffusionPipeline on the same latents and prompt embeddings.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from pd_core import samplers
from pd_core.denoiser import Denoiser
from pd_core.interop.sd_pipeline import build_text_encoder, build_tokenizer, encode_prompts, read_text_to_image_model
from pd_core.interop.sd_unet import (
    COND_PROJ_KEY,
    TextUNetNet,
    build_cond_unet,
    guidance_scale_embedding,
    guidance_scale_embedding_f64,
    guided_student_unet,
)
from pd_core.text_guidance import TextGuidedDenoiser, stage1_target, student_denoiser
from tests.sd_models import diffusers, load_sd_pipeline, one_thread, saved_sd_pipeline


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]
KIND = {"epsilon": "eps", "v_prediction": "v"}


@functools.cache
def imported(prediction_type: str = "epsilon"):
    """(our model, float32 teacher net, prompt embeddings (2, L, D), the empty prompt's (1, L, D)) of a saved folder."""
    model = read_text_to_image_model(f"diffusers:{saved_sd_pipeline(prediction_type)}")
    net = TextUNetNet(build_cond_unet(model.configs["unet"], model.weights["unet"]), schedule=model.schedule)
    tokenizer, encoder = build_tokenizer(model), build_text_encoder(model)
    return model, net, encode_prompts(tokenizer, encoder, PROMPTS), encode_prompts(tokenizer, encoder, [""])


@pytest.mark.parametrize("dim", [256, 7])
def test_our_guidance_embedding_is_the_one_stable_diffusion_pipeline_feeds_the_unet(dim):
    pipe = diffusers.StableDiffusionPipeline  # the method uses no pipeline state
    for scale in (1.0, 1.5, 3.0, 8.5):
        w = torch.tensor(scale - 1).repeat(3)  # exactly what __call__ builds for guidance_scale
        want = pipe.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim=dim), want)
        # float32 angles 1000 w f_k reach 7500 rad: their rounding (4e-4 rad) bounds the distance to float64
        np.testing.assert_allclose(want[0].double().numpy(), guidance_scale_embedding_f64(scale - 1, dim=dim).numpy(),
                                   atol=1e-3, rtol=0)


@torch.no_grad()
def _reference_target(net: TextUNetNet, *, z, logsnr, context, null_context, w, kind: str):
    """x_hat_w and eps_hat_w in float64 from two separate calls, from the equations alone."""
    unet = net.unet.double()
    try:
        tau = net.schedule.timestep(logsnr)
        cond = unet(z.double(), tau, encoder_hidden_states=context.double()).sample
        uncond = unet(z.double(), tau, encoder_hidden_states=null_context.double().expand_as(context)).sample
    finally:
        net.unet.float()
    lam = logsnr.double()[:, None, None, None]
    alpha, sigma = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    zz = z.double()

    def x_eps(out):
        if kind == "eps":
            return (zz - sigma * out) / alpha, out
        x = alpha * zz - sigma * out  # v
        return x, (zz - alpha * x) / sigma

    (xc, ec), (xu, eu) = x_eps(cond), x_eps(uncond)
    ww = torch.as_tensor(w, dtype=torch.float64)[:, None, None, None]
    return (1 + ww) * xc - ww * xu, (1 + ww) * ec - ww * eu


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@torch.no_grad()
def test_the_stage1_target_is_the_guided_teacher_of_a_float64_reference(prediction_type):
    model, net, context, null = imported(prediction_type)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 4, 4, generator=g)
    logsnr = model.schedule.logsnr(torch.tensor([0.3, 0.8], dtype=torch.float64)).float()
    w = torch.tensor([0.0, 2.5])
    teacher = Denoiser(net, parameterization=KIND[prediction_type])
    x_w, eps_w = stage1_target(teacher, z=z, logsnr=logsnr, context=context, null_context=null, w=w)
    x_ref, eps_ref = _reference_target(net, z=z, logsnr=logsnr, context=context, null_context=null, w=w,
                                       kind=KIND[prediction_type])
    np.testing.assert_allclose(x_w.double().numpy(), x_ref.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eps_w.double().numpy(), eps_ref.numpy(), rtol=1e-4, atol=1e-4)
    x_c, _ = teacher.with_labels(context)(z, logsnr)
    assert torch.allclose(x_w[0], x_c[0], atol=1e-5)  # w = 0 is the conditional model
    assert float((x_w[1] - x_c[1]).abs().max()) > 1e-2  # w = 2.5 is not: the guidance term is live


@torch.no_grad()
def test_the_zero_initialised_student_is_the_teacher_at_every_w_until_it_learns():
    model, net, context, _ = imported()
    student_unet = guided_student_unet(net.unet, dim=16)
    assert student_unet.config.time_cond_proj_dim == 16
    assert float(student_unet.state_dict()[COND_PROJ_KEY].abs().max()) == 0.0
    student = Denoiser(TextUNetNet(student_unet, schedule=model.schedule), parameterization="eps")
    teacher = Denoiser(net, parameterization="eps").with_labels(context)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    logsnr = model.schedule.logsnr(torch.tensor([0.1, 0.9], dtype=torch.float64)).float()
    want = teacher.output(z, logsnr)
    for w in (0.0, 0.5, 3.0, 7.5):
        assert torch.equal(student_denoiser(student, context=context, w=w).output(z, logsnr), want), w
    # the embedding is live: a nonzero cond_proj moves the output at w > 0
    student_unet.time_embedding.cond_proj.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    assert float((student_denoiser(student, context=context, w=3.0).output(z, logsnr) - want).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="already has a guidance embedding"):
        guided_student_unet(student_unet)


def _stock_latents(pipe, *, z, context, null, steps: int, scale: float):
    sched = pipe.scheduler.config
    assert (sched.timestep_spacing, sched.set_alpha_to_one, sched.clip_sample) == ("trailing", True, False)
    out = pipe(prompt_embeds=context, negative_prompt_embeds=null.expand_as(context), latents=z.clone(),
               num_inference_steps=steps, guidance_scale=scale, output_type="latent")
    return out.images


@functools.cache
def float64_pair(prediction_type: str):
    """(stock StableDiffusionPipeline, our imported teacher Denoiser), both float64."""
    model, *_ = imported(prediction_type)
    pipe = load_sd_pipeline(saved_sd_pipeline(prediction_type)).to(torch.float64)
    net64 = TextUNetNet(build_cond_unet(model.configs["unet"], model.weights["unet"]).double(),
                        schedule=model.schedule)
    return pipe, Denoiser(net64, parameterization=KIND[prediction_type])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_our_guided_latent_ddim_equals_stock_stable_diffusion_pipeline(prediction_type, steps):
    model, net, context, null = imported(prediction_type)
    pipe, teacher = float64_pair(prediction_type)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    for w in (0.0, 2.0):
        sampler = TextGuidedDenoiser(teacher, context=context.double(), null_context=null.double(), w=w)
        ours = samplers.ddim(sampler, z, num_steps=steps, clip=False, schedule=model.schedule)
        ref = _stock_latents(pipe, z=z, context=context.double(), null=null.double(), steps=steps, scale=1.0 + w)
        assert float((ref - z).abs().max()) > 1e-2  # the reference moved: the comparison is not vacuous
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-4, err_msg=f"w={w}")


@torch.no_grad()
def test_caption_indices_as_class_labels_give_the_text_guided_model_through_the_class_machinery():
    from pd_core.guidance import GuidedDenoiser
    from pd_core.interop.sd_unet import CaptionTableNet

    model, net, context, null = imported()
    table_net = CaptionTableNet(net, caption_embeds=context, null_embed=null)
    assert table_net.null_label == 2 and "table" not in table_net.state_dict()  # data, not weights
    y = torch.tensor([1, 0, 1])
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    lam = model.schedule.logsnr(torch.tensor([0.2, 0.6, 0.9], dtype=torch.float64)).float()
    via_labels = GuidedDenoiser(Denoiser(table_net, parameterization="eps"), y=y, w=2.0, null_label=2)(z, lam)
    via_text = TextGuidedDenoiser(Denoiser(net, parameterization="eps"), context=context[y], null_context=null,
                                  w=2.0)(z, lam)
    for got, want in zip(via_labels, via_text, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
