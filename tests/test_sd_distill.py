"""Guided distillation of a text-conditioned latent teacher: stage 1's loss draws what it says and trains the
zero-initialised student towards the guided teacher; Algorithm 2 holds on the student with prompts and w bound.
"""

from __future__ import annotations

import functools

import pytest
import torch

from pd_core import distill
from pd_core.denoiser import Denoiser
from pd_core.interop.sd_pipeline import build_text_encoder, build_tokenizer, encode_prompts, read_text_to_image_model
from pd_core.interop.sd_unet import TextUNetNet, build_cond_unet, guided_student_unet
from pd_core.schedule import alpha_sigma
from pd_core.text_guidance import TextGuidanceLoss, stage1_target, student_denoiser
from tests.sd_models import one_thread, saved_sd_pipeline


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()

PROMPTS = ["a photo of a sneaker", "a photo of a bag", "a photo of a coat", "a photo of a sneaker"]


@functools.cache
def teacher_parts():
    model = read_text_to_image_model(f"diffusers:{saved_sd_pipeline()}")
    tokenizer, encoder = build_tokenizer(model), build_text_encoder(model)
    return model, encode_prompts(tokenizer, encoder, PROMPTS), encode_prompts(tokenizer, encoder, [""])


def nets():
    model, context, null = teacher_parts()
    unet = build_cond_unet(model.configs["unet"], model.weights["unet"]).requires_grad_(False)
    teacher = Denoiser(TextUNetNet(unet, schedule=model.schedule), parameterization="eps")
    student_unet = guided_student_unet(unet, dim=16).requires_grad_(True).train()
    student = Denoiser(TextUNetNet(student_unet, schedule=model.schedule), parameterization="eps")
    return model, context, null, teacher, student


def test_the_stage1_loss_draws_t_on_the_teachers_timesteps_then_eps_then_w_and_targets_the_guided_teacher():
    model, context, null, teacher, _ = nets()
    loss = TextGuidanceLoss(teacher, w_min=0.5, w_max=4.0, weighting="snr", schedule=model.schedule)
    x = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    z, lam, w, x_w = loss.targets(x, context, null, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = 1e-3 + (1 - 1e-3) * torch.rand(4, dtype=torch.float64, generator=g)
    eps = torch.randn(x.shape, generator=g)
    w_ref = 0.5 + 3.5 * torch.rand(4, generator=g)
    lam_ref = model.schedule.logsnr(t).float()
    alpha, sigma = alpha_sigma(lam_ref)
    assert torch.equal(lam, lam_ref) and torch.equal(w, w_ref)
    assert torch.equal(z, alpha[:, None, None, None] * x + sigma[:, None, None, None] * eps)
    want, _ = stage1_target(teacher, z=z, logsnr=lam, context=context, null_context=null, w=w)
    assert torch.equal(x_w, want)


def test_stage1_updates_on_one_draw_bring_the_zero_initialised_student_towards_the_guided_teacher():
    model, context, null, teacher, student = nets()
    loss = TextGuidanceLoss(teacher, w_min=1.0, w_max=3.0, weighting="snr", schedule=model.schedule)
    x = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1))

    def draw() -> torch.Tensor:  # the same (t, eps, w) every time: the gradient must lower this loss
        return loss(student, x, context, null, generator=torch.Generator().manual_seed(99)).mean()

    with torch.no_grad():
        before = float(draw())
    opt = torch.optim.Adam(student.net.parameters(), lr=5e-4)
    for _ in range(8):
        opt.zero_grad()
        draw().backward()
        opt.step()
    with torch.no_grad():
        after = float(draw())
    assert before > 1e-3  # the guided teacher is not the conditional model the student starts as
    assert float(student.net.unet.time_embedding.cond_proj.weight.detach().abs().max()) > 0  # the embedding learned
    assert after < 0.8 * before, (before, after)


@torch.no_grad()
def test_algorithm_2_holds_on_a_guided_text_student_with_prompts_and_w_bound():
    model, context, _, _, student = nets()
    student.net.double().eval()
    student.net.unet.time_embedding.cond_proj.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    bound = student_denoiser(student, context=context.double(), w=torch.tensor([0.0, 1.0, 2.0, 4.0]))
    n = 4  # the student's steps; its teacher walks 8
    z = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    x_tilde = distill.distillation_target(bound, z=z, t=t, num_steps=n, schedule=model.schedule)
    lam = [model.schedule.logsnr(t - k / (2 * n)) for k in range(3)]  # t, t', t''
    x1, e1 = bound(z, lam[0])
    z_mid = distill.ddim_step(x_hat=x1, eps_hat=e1, logsnr_s=lam[1])
    x2, e2 = bound(z_mid, lam[1])
    z_two = distill.ddim_step(x_hat=x2, eps_hat=e2, logsnr_s=lam[2])
    alpha_t, sigma_t = (v[:, None, None, None] for v in alpha_sigma(lam[0]))
    eps_tilde = (z - alpha_t * x_tilde) / sigma_t
    z_one = distill.ddim_step(x_hat=x_tilde, eps_hat=eps_tilde, logsnr_s=lam[2])
    torch.testing.assert_close(z_one, z_two, rtol=0, atol=1e-9)  # one student step lands on two teacher steps
    assert float((x_tilde - x1).abs().max()) > 1e-3  # and the target is not the teacher's own x_hat
