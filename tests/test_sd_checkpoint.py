"""A text-to-image UNet as a store checkpoint: saved without pickles, loaded by models.load_model from its manifest
alone, sampling exactly as the imported network; a guided student's architecture round-trips too.
"""

from __future__ import annotations

import pytest
import torch

from pd_core import samplers
from pd_core.architecture import architecture_from_manifest
from pd_core.denoiser import Denoiser
from pd_core.interop.sd_pipeline import (
    build_text_encoder,
    build_tokenizer,
    encode_prompts,
    read_text_to_image_model,
    teacher_checkpoint,
)
from pd_core.interop.sd_unet import PREFIX, TextUNetCondition, TextUNetNet, build_cond_unet, guided_student_unet
from pd_core.models import load_model
from pd_core.store import CheckpointStore, StoreError
from pd_core.text_guidance import student_denoiser
from tests.sd_models import one_thread, saved_sd_pipeline

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@torch.no_grad()
def test_an_imported_text_to_image_unet_round_trips_through_the_store_and_samples_the_same(tmp_path):
    model = read_text_to_image_model(str(saved_sd_pipeline()))
    tensors, fields = teacher_checkpoint(model)
    store = CheckpointStore(str(tmp_path / "store"))
    store.save_checkpoint("pipelines/t/teacher", tensors=tensors, manifest={"kind": "teacher", "steps": 8, **fields})
    loaded = load_model(store, "pipelines/t/teacher")
    assert isinstance(loaded.architecture, TextUNetCondition) and loaded.image_shape == (4, 4, 4)
    assert loaded.schedule == model.schedule and loaded.manifest["parent_sha256"] == model.source_sha256
    assert not loaded.architecture.guidance_embedding and loaded.num_classes == 0
    context = encode_prompts(build_tokenizer(model), build_text_encoder(model), PROMPTS)
    reference = Denoiser(TextUNetNet(build_cond_unet(model.configs["unet"], model.weights["unet"]),
                                     schedule=model.schedule), parameterization="eps").with_labels(context)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = samplers.ddim(loaded.denoiser.with_labels(context), z, num_steps=4, clip=False, schedule=loaded.schedule)
    want = samplers.ddim(reference, z, num_steps=4, clip=False, schedule=model.schedule)
    assert torch.equal(ours, want)


def test_a_guided_students_architecture_round_trips_and_refuses_weights_that_do_not_fit(tmp_path):
    model = read_text_to_image_model(str(saved_sd_pipeline()))
    _, fields = teacher_checkpoint(model)
    arch = architecture_from_manifest(fields).with_guidance_embedding(16)
    assert arch.guidance_embedding
    assert architecture_from_manifest({**arch.manifest_fields(), "schedule": fields["schedule"]}) == arch
    student = guided_student_unet(build_cond_unet(model.configs["unet"], model.weights["unet"]), dim=16)
    tensors = {PREFIX + k: v for k, v in student.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == arch.state_shapes()
    store = CheckpointStore(str(tmp_path / "store"))
    manifest = {"kind": "student", "steps": 4, **arch.manifest_fields(), "schedule": fields["schedule"],
                "parameterization": "v"}
    store.save_checkpoint("s", tensors=tensors, manifest=manifest)
    loaded = load_model(store, "s")
    context = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    lam = model.schedule.logsnr(torch.tensor([0.5, 0.25], dtype=torch.float64)).float()
    with torch.no_grad():
        got = student_denoiser(loaded.denoiser, context=context, w=2.0).output(z, lam)
        want = student_denoiser(Denoiser(TextUNetNet(student, schedule=model.schedule), parameterization="v"),
                                context=context, w=2.0).output(z, lam)
    assert torch.equal(got, want)
    store.save_checkpoint("bad", tensors={k: v for k, v in tensors.items() if "cond_proj" not in k}, manifest=manifest)
    with pytest.raises(StoreError, match="weights do not fit the architecture"):
        load_model(store, "bad")


@torch.no_grad()
def test_a_stored_guided_student_exports_as_a_stock_pipeline_equal_to_our_sampler(tmp_path):
    from pd_core.export.files import ExportError
    from pd_core.export.to_sd_pipeline import SAMPLER_FILE, export_student_checkpoint
    from tests.sd_models import load_sd_pipeline

    model = read_text_to_image_model(str(saved_sd_pipeline()))
    _, fields = teacher_checkpoint(model)
    arch = architecture_from_manifest(fields).with_guidance_embedding(16)
    student = guided_student_unet(build_cond_unet(model.configs["unet"], model.weights["unet"]), dim=16)
    student.time_embedding.cond_proj.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    store = CheckpointStore(str(tmp_path / "store"))
    store.save_checkpoint("r2", tensors={PREFIX + k: v for k, v in student.state_dict().items()},
                          manifest={"kind": "student", "round": 2, "steps": 2, **arch.manifest_fields(),
                                    "schedule": fields["schedule"], "parameterization": "v"})
    loaded = load_model(store, "r2")
    out = export_student_checkpoint(loaded, teacher=model, out=str(tmp_path / "export"))
    assert '"round": 2' in (out / SAMPLER_FILE).read_text() and '"steps": 2' in (out / SAMPLER_FILE).read_text()
    pipe = load_sd_pipeline(out)
    context = encode_prompts(build_tokenizer(model), build_text_encoder(model), PROMPTS)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    ref = pipe(prompt_embeds=context, latents=z.clone(), num_inference_steps=2, guidance_scale=3.0,
               output_type="latent").images
    ours = samplers.ddim(student_denoiser(loaded.denoiser, context=context, w=2.0), z, num_steps=2, clip=False,
                         schedule=loaded.schedule)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    store.save_checkpoint("t", tensors=teacher_checkpoint(model)[0], manifest={"kind": "teacher", "steps": 8,
                                                                              **fields})
    with pytest.raises(ExportError, match="does not divide"):
        export_student_checkpoint(load_model(store, "t"), teacher=model, out=str(tmp_path / "e2"), steps=3)
