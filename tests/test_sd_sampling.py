"""Text-to-image sampling end to end (prompts -> latents -> VAE -> images) equals stock StableDiffusionPipeline's
images, for the teacher with classifier-free guidance (two UNet calls a step) and a guided student (one call).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core.images import to_uint8
from pd_core.interop.sd_pipeline import read_text_to_image_model
from pd_core.interop.sd_sampling import PromptSampler, decode_latents, sample_images, sample_latents
from pd_core.interop.sd_unet import build_cond_unet, guided_student_unet
from tests.sd_models import load_sd_pipeline, one_thread, saved_sd_pipeline, tiny_vae

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def _count_calls(pipe) -> list[int]:
    calls: list[int] = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


@torch.no_grad()
def test_the_teachers_guided_images_equal_stock_stable_diffusion_pipeline_with_two_calls_a_step():
    folder = saved_sd_pipeline()
    sampler = PromptSampler.of(read_text_to_image_model(str(folder))).to(torch.float64)
    pipe = load_sd_pipeline(folder).to(torch.float64)
    calls = _count_calls(pipe)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for w, per_step in ((0.0, 2), (2.0, 4)):
        calls.clear()
        ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=4, guidance_scale=1.0 + w, output_type="np").images
        assert calls == [per_step] * 4
        ours = sample_images(sampler, prompts=PROMPTS, w=w, steps=4, noise=z)
        assert ours.shape == (2, 3, 8, 8)
        np.testing.assert_allclose((ours.permute(0, 2, 3, 1).numpy() + 1) / 2, ref, atol=1e-5, rtol=0)
    assert 0 < float(ours.std())  # images, not a constant


@torch.no_grad()
def test_a_guided_students_images_equal_the_stock_pipeline_of_its_export_with_one_call_a_step(tmp_path):
    from pd_core.export.to_sd_pipeline import export_text_to_image

    model = read_text_to_image_model(str(saved_sd_pipeline()))
    student = guided_student_unet(build_cond_unet(model.configs["unet"], model.weights["unet"]), dim=16)
    student.time_embedding.cond_proj.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    out = export_text_to_image(student_unet=student, parameterization="v", teacher=model, steps=2,
                               out=str(tmp_path / "student"))
    sampler = PromptSampler.of(model, unet=student, parameterization="v").to(torch.float64)
    pipe = load_sd_pipeline(out).to(torch.float64)
    calls = _count_calls(pipe)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = pipe(PROMPTS, latents=z.clone(), num_inference_steps=2, guidance_scale=4.0, output_type="np").images
    assert calls == [2, 2]
    ours = sample_images(sampler, prompts=PROMPTS, w=3.0, steps=2, noise=z)
    np.testing.assert_allclose((ours.permute(0, 2, 3, 1).numpy() + 1) / 2, ref, atol=1e-5, rtol=0)
    pixels = to_uint8(ours.float()).permute(0, 2, 3, 1).numpy()
    assert np.abs(pixels.astype(int) - (ref * 255).round().astype(int)).max() <= 1  # PNG pixels agree


@torch.no_grad()
def test_decoding_divides_by_the_scaling_factor_and_clamps():
    vae = tiny_vae(seed=3).double()
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(20)  # outputs well outside [-1, 1], so the clamp matters
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5
    want = vae.decode(latents / 0.5).sample
    assert float(want.abs().max()) > 1.5
    got = decode_latents(vae, latents, scaling_factor=0.5)
    assert torch.equal(got, want.clamp(-1, 1))
    assert not torch.equal(got, decode_latents(vae, latents, scaling_factor=0.25))
    sampler = PromptSampler.of(read_text_to_image_model(str(saved_sd_pipeline())))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 4, 4, 4\)"):
        sample_latents(sampler, prompts=PROMPTS, w=1.0, steps=2, noise=torch.zeros(2, 4, 8, 8))


@torch.no_grad()
def test_a_prompt_grid_has_one_row_per_prompt_and_says_which(tmp_path):
    from PIL import Image

    from pd_core.images import write_display_grid
    from pd_core.interop.sd_sampling import prompt_grid

    sampler = PromptSampler.of(read_text_to_image_model(str(saved_sd_pipeline())))
    images, caption = prompt_grid(sampler, prompts=PROMPTS, per_prompt=3, w=1.5, steps=2, seed=7)
    assert images.shape == (6, 3, 8, 8)
    assert caption == "2 steps, w = 1.5: row 1 'a photo of a sneaker'; row 2 'a photo of a bag'"
    noise = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    row2 = sample_images(sampler, prompts=[PROMPTS[1]] * 3, w=1.5, steps=2, noise=noise[3:])
    torch.testing.assert_close(images[3:], row2, rtol=0, atol=1e-6)  # row 2 is the second prompt's samples
    path = write_display_grid(images, str(tmp_path / "grid.png"), caption=caption, nrow=3)
    assert Image.open(path).size[0] >= 512


@torch.no_grad()
def test_a_prompt_grid_in_batches_runs_the_unet_and_vae_on_at_most_the_batch_and_changes_no_sample():
    from pd_core.interop.sd_sampling import prompt_grid

    sampler = PromptSampler.of(read_text_to_image_model(str(saved_sd_pipeline())))
    whole, _ = prompt_grid(sampler, prompts=PROMPTS, per_prompt=3, w=1.5, steps=2, seed=7)
    seen = {"unet": [], "vae": []}
    hooks = [sampler.net.unet.register_forward_hook(lambda m, args, kw, out: seen["unet"].append(args[0].shape[0]),
                                                    with_kwargs=True),
             sampler.vae.decoder.register_forward_hook(lambda m, args, out: seen["vae"].append(args[0].shape[0]))]
    try:
        batched, _ = prompt_grid(sampler, prompts=PROMPTS, per_prompt=3, w=1.5, steps=2, seed=7, batch_size=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert max(seen["unet"]) == 4 and seen["vae"] == [2, 2, 2]  # 2 samples, doubled for the guided teacher
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-5)
