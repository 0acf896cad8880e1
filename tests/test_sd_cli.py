"""``pd sample --prompt`` and ``pd export --format diffusers`` of a text-to-image student: the exported folder loads in
stock StableDiffusionPipeline and equals ``pd sample`` on the same latents to 1e-4; a prompt grid is written, and
what a text model cannot do is refused with one line.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from pd_core.architecture import architecture_from_manifest
from pd_core.interop.sd_pipeline import read_text_to_image_model, teacher_checkpoint
from pd_core.interop.sd_unet import PREFIX, build_cond_unet, guided_student_unet
from pd_core.store import CheckpointStore
from tests.sd_models import load_sd_pipeline, one_thread, saved_sd_pipeline

PROMPTS = ["a photo of a bag", "a photo of a coat"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@functools.cache
def stored_student(root: str) -> str:
    """A guided 2-step v student (its guidance embedding perturbed) in a pipeline store, as `pd run` lays it out."""
    model = read_text_to_image_model(str(saved_sd_pipeline()))
    _, fields = teacher_checkpoint(model)
    arch = architecture_from_manifest(fields).with_guidance_embedding(16)
    student = guided_student_unet(build_cond_unet(model.configs["unet"], model.weights["unet"]), dim=16)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    store = CheckpointStore(root)
    key = "pipelines/t2i/rounds/02-0002"
    store.save_checkpoint(key, tensors={PREFIX + k: v for k, v in student.state_dict().items()},
                          manifest={"kind": "student", "round": 2, "steps": 2, "pipeline": "t2i",
                                    **arch.manifest_fields(), "schedule": fields["schedule"], "parameterization": "v",
                                    "text_to_image": fields["text_to_image"]})
    return store.uri(key)


def test_the_exported_pipeline_equals_pd_sample_in_stock_diffusers(tmp_path):
    from flows.export import export_model
    from flows.sampling import prompt_images
    from pd_core.models import load_model_uri

    uri = stored_student(str(tmp_path / "store"))
    ours, caption = prompt_images(load_model_uri(uri), source=uri, prompts=PROMPTS, num=2, steps=2, seed=5,
                                  guidance=2.0, device=torch.device("cpu"))
    assert caption == "2 steps, w = 2: row 1 'a photo of a bag'; row 2 'a photo of a coat'"
    summary = export_model(model=uri, fmt="diffusers", out=str(tmp_path / "exported"))
    out = tmp_path / "exported"
    assert f"StableDiffusionPipeline.from_pretrained({str(out)!r})(prompt, num_inference_steps=2, " \
           f"guidance_scale=3)" in summary and "2 sampling step(s)" in (out / "README.md").read_text()
    latents = torch.randn((4, 4, 4, 4), generator=torch.Generator().manual_seed(5))
    pipe = load_sd_pipeline(out)
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    stock = pipe([p for p in PROMPTS for _ in range(2)], latents=latents, num_inference_steps=2, guidance_scale=3.0,
                 output_type="pt").images  # (x / 2 + 1 / 2).clamp(0, 1)
    assert len(calls) == 2  # one UNet call per step: the guidance is the student's embedding
    assert float((ours - ours.mean()).abs().max()) > 1e-2  # not a constant image
    torch.testing.assert_close(ours, stock * 2 - 1, rtol=0, atol=1e-4)


def test_a_text_model_refuses_onnx_and_sample_needs_a_prompt(tmp_path):
    from flows.cli_args import BadArgument
    from flows.export import export_model
    from flows.sampling import sample_to_grid
    from pd_core.export.files import ExportError

    uri = stored_student(str(tmp_path / "store"))
    with pytest.raises(ExportError, match="exports as a diffusers StableDiffusionPipeline folder only"):
        export_model(model=uri, fmt="onnx", out=str(tmp_path / "m.onnx"))
    with pytest.raises(BadArgument, match="--prompt is required"):
        sample_to_grid(model=uri, steps=None, num=2, out=str(tmp_path / "g.png"), sampler="ddim", gamma=0.3, seed=0,
                       batch_size=2, device="cpu", throughput=False)


@pytest.mark.integration
def test_pd_sample_writes_a_prompt_grid_and_refuses_a_label(tmp_path):
    from tests.pipeline.helpers import assert_one_line_error, is_png, run_pd

    uri = stored_student(str(tmp_path / "store"))
    grid = tmp_path / "grid.png"
    proc = run_pd("sample", "--model", uri, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num", "3",
                  "--guidance", "2", "--out", str(grid), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert is_png(grid) and "wrote 6 samples (2 prompt(s), 2 steps, guidance w = 2)" in proc.stdout
    proc = run_pd("sample", "--model", uri, "--prompt", PROMPTS[0], "--label", "1", "--out", str(tmp_path / "x.png"),
                  cwd=tmp_path)
    assert_one_line_error(proc, code=2, mentions="takes --prompt")
    assert not Path(tmp_path / "x.png").exists()


def test_pd_sample_prompt_checks_memory_and_grid_size_before_sampling_and_samples_in_batches(tmp_path, monkeypatch):
    import flows.sampling as sampling
    from flows.cli_args import BadArgument

    uri = stored_student(str(tmp_path / "store"))
    batches, real = [], sampling.prompt_grid
    monkeypatch.setattr(sampling, "prompt_grid", lambda *a, **k: batches.append(k["batch_size"]) or real(*a, **k))
    out = tmp_path / "g.png"
    args = {"model": uri, "steps": None, "out": str(out), "sampler": "ddim", "gamma": 0.3, "seed": 0, "device": "cpu",
            "throughput": False, "prompts": PROMPTS, "num": 2}
    monkeypatch.setattr(sampling, "MAX_SAMPLE_BYTES", 4 * 3 * 8 * 8 * 4 - 1)  # one byte short of 4 images of 3x8x8
    with pytest.raises(BadArgument, match=r"^--num 2: 4 images of 3x8x8 take"):
        sampling.sample_to_grid(batch_size=1, **args)
    monkeypatch.setattr(sampling, "MAX_SAMPLE_BYTES", 4 * 3 * 8 * 8 * 4)
    with pytest.raises(BadArgument, match=r"^--num 2 --scale 2000: a display grid of"):
        sampling.sample_to_grid(batch_size=1, scale=2000, **args)
    assert batches == [] and not out.exists()  # refused before any sample
    assert "wrote 4 samples" in sampling.sample_to_grid(batch_size=3, **args)
    assert batches == [3] and out.exists()
