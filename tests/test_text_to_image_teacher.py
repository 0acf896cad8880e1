"""benchmarks/text_to_image/train_teacher: the tiny teacher trains, its losses follow diffusers' recipe, its
folder is a stock StableDiffusionPipeline the import accepts, and a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from benchmarks.text_to_image import components as C  # noqa: E402
from benchmarks.text_to_image import recipe  # noqa: E402
from benchmarks.text_to_image.train_teacher import StateMismatch, Trainer, main, tiny_config  # noqa: E402
from pd_core.data.class_captions import FASHION_MNIST_NAMES, TEMPLATE  # noqa: E402
from pd_core.interop.sd_folder import read_text_to_image  # noqa: E402
from pd_core.interop.sd_pipeline import read_text_to_image_model  # noqa: E402
from tests.sd_models import load_sd_pipeline, one_thread  # noqa: E402

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def _train(out: Path, *, stop_after: int | None = None, **changes) -> Trainer:
    trainer = Trainer(tiny_config(**changes), out=out, data_url=None, save_every=2, log_every=100)
    trainer.run(stop_after=stop_after)
    return trainer


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("t2i") / "teacher"
    _train(out)
    return out


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        tensors.update({f"{name}:{k}": v for k, v in load_file(str(folder / name)).items()})
    return tensors


@pytest.mark.slow
def test_the_tiny_teacher_is_a_stock_pipeline_that_the_import_accepts(tiny_teacher):
    tti = read_text_to_image(f"diffusers:{tiny_teacher}")
    record = json.loads((tiny_teacher / "train.json").read_text())
    assert tti.configs["vae"]["scaling_factor"] == pytest.approx(record["scaling_factor"])
    assert tti.configs["unet"]["cross_attention_dim"] == C.TINY.text_hidden
    model = read_text_to_image_model(tti)  # the import's full read: every file hashed, weights as tensors
    assert model.scaling_factor == pytest.approx(record["scaling_factor"]) and model.parameterization == "eps"
    pipe = load_sd_pipeline(tiny_teacher)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"
    image = pipe("a photo of a sneaker", num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.slow
def test_a_run_killed_twice_and_resumed_ends_with_the_uninterrupted_runs_weights(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "teacher"
    _train(out, stop_after=3)  # in the VAE phase: resumes from the state of update 2
    assert not out.exists() and torch.load(out.with_name("teacher.state.pt"), weights_only=True)["step"] == 2
    _train(out, stop_after=7)  # in the diffusion phase: resumes from update 6
    _train(out)
    assert "resumed from" in capsys.readouterr().out
    ours, reference = _safetensors(out), _safetensors(tiny_teacher)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


@pytest.mark.slow
def test_a_state_written_with_other_settings_is_refused_with_exit_2(tmp_path, capsys):
    out = tmp_path / "teacher"
    _train(out, stop_after=2)
    with pytest.raises(StateMismatch, match="batch_size"):
        _train(out, batch_size=4)
    assert main(["--out", str(out), "--tiny", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size" in err[0] and "delete the state file" in err[0]


@pytest.mark.slow
def test_both_losses_decrease_on_a_fixed_batch():
    torch.manual_seed(0)
    vae, unet = C.build_vae(sizes=C.TINY, seed=0), C.build_unet(sizes=C.TINY, seed=1)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    losses = {"vae": [], "unet": []}
    vae_opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(8):
        loss = recipe.vae_loss(vae, x, kl_weight=1e-3, generator=torch.Generator().manual_seed(1))[0]
        vae_opt.zero_grad()
        loss.backward()
        vae_opt.step()
        losses["vae"].append(float(loss.detach()))
    scheduler = C.train_scheduler("epsilon")
    z0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    k, embeds = torch.tensor([10, 300, 600, 990]), torch.randn(4, C.TINY.max_length, C.TINY.text_hidden)
    unet_opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    for _ in range(8):
        loss = recipe.diffusion_loss(unet, scheduler, z0=z0, noise=noise, timesteps=k, embeds=embeds)
        unet_opt.zero_grad()
        loss.backward()
        unet_opt.step()
        losses["unet"].append(float(loss.detach()))
    for name, values in losses.items():
        assert np.isfinite(values).all() and values[-1] < 0.9 * values[0], (name, values)


def _alpha_bar_float64() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_noised_latent_and_the_target_match_a_float64_reference(prediction_type):
    scheduler = C.train_scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    k = torch.tensor([0, 499, 999])
    a = _alpha_bar_float64()[k].sqrt().view(-1, 1, 1, 1)
    s = (1 - _alpha_bar_float64()[k]).sqrt().view(-1, 1, 1, 1)
    noisy = scheduler.add_noise(z0, noise, k)
    torch.testing.assert_close(noisy.double(), a * z0.double() + s * noise.double(), atol=1e-5, rtol=0)
    target = recipe.diffusion_target(scheduler, z0, noise, k).double()
    expected = noise.double() if prediction_type == "epsilon" else a * noise.double() - s * z0.double()
    torch.testing.assert_close(target, expected, atol=1e-5, rtol=0)


def test_the_vae_loss_is_reconstruction_plus_the_closed_form_kl_per_pixel():
    vae = C.build_vae(sizes=C.TINY, seed=0).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        total, mse, kl = recipe.vae_loss(vae, x, kl_weight=0.5, generator=torch.Generator().manual_seed(0))
        dist = vae.encode(x).latent_dist
    mu, var = dist.mean.double(), dist.var.double()
    closed = 0.5 * (mu ** 2 + var - 1 - var.log()).sum(dim=(1, 2, 3)).mean() / (3 * 32 * 32)
    assert float(kl) == pytest.approx(float(closed), rel=1e-4)
    assert float(total) == pytest.approx(float(mse) + 0.5 * float(kl), rel=1e-5)


def test_the_scaling_factor_gives_the_sampled_latents_unit_standard_deviation():
    mean, std = torch.randn(50, 4, 3, 3) * 3 + 1, torch.rand(50, 4, 3, 3)
    scale = recipe.scaling_factor(mean, std, generator=torch.Generator().manual_seed(5))
    z = recipe.sample_latents(mean, std, scale=scale, generator=torch.Generator().manual_seed(5))
    assert float(z.double().std()) == pytest.approx(1.0, abs=1e-6)


def test_every_caption_tokenizes_into_known_tokens_with_each_class_word_one_token(tmp_path):
    tokenizer = C.build_tokenizer(tmp_path / "tok", sizes=C.Sizes())
    for name in FASHION_MNIST_NAMES:
        caption = TEMPLATE.format(name)
        tokens = tokenizer.tokenize(caption)
        assert tokenizer.unk_token not in tokens
        decoded = tokenizer.decode(tokenizer(caption).input_ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == caption.replace(" ", "")  # CLIP's decode spaces out "t - shirt"
        assert len(tokenizer(caption).input_ids) <= tokenizer.model_max_length
    assert tokenizer.tokenize("a photo of a sneaker") == ["a</w>", "photo</w>", "of</w>", "a</w>", "sneaker</w>"]


@pytest.mark.slow
def test_the_written_caption_folder_reads_back_as_the_teachers_images_and_captions(tmp_path):
    from benchmarks.text_to_image.train_teacher import load_data
    from benchmarks.text_to_image.write_captions import main as write_main
    from pd_core.data.captions import load_captions

    assert write_main(["--out", str(tmp_path / "data"), "--limit", "30"]) == 0
    read = load_captions(str(tmp_path / "data"), size=32)
    images, captions = load_data(tiny_config(data_limit=30), data_url=None)
    assert list(read.captions) == captions and captions.count("") == 3
    torch.testing.assert_close(read.images, images, atol=0.5 / 127.5, rtol=0)
    assert write_main(["--out", str(tmp_path / "bad"), "--limit", "0"]) == 2
