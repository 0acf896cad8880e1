"""A text-to-image teacher through the class-label jobs: the caption-table architecture keeps the checkpoint's state
dict, the stage-1 student the jobs build starts as the teacher at every w, stage 1 draws t from the first training
timestep on, and encoded data reaches the rounds as class-labelled latents.
"""

from __future__ import annotations

import functools

import pytest
import torch

from pd_core.architecture import architecture_from_manifest
from pd_core.denoiser import Denoiser
from pd_core.guidance import GuidanceLoss, GuidedDenoiser
from pd_core.interop.sd_pipeline import (
    build_text_encoder,
    build_tokenizer,
    encode_prompts,
    read_text_to_image_model,
    teacher_checkpoint,
)
from pd_core.interop.sd_unet import CaptionTableArch, TextUNetNet
from pd_core.schedule import alpha_sigma
from pd_core.text_guidance import TextGuidedDenoiser
from tests.sd_models import one_thread, saved_sd_pipeline

PROMPTS = ["a photo of a sneaker", "a photo of a bag"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@functools.cache
def teacher():
    model = read_text_to_image_model(str(saved_sd_pipeline()))
    tensors, fields = teacher_checkpoint(model)
    context = encode_prompts(build_tokenizer(model), build_text_encoder(model), PROMPTS)
    null = encode_prompts(build_tokenizer(model), build_text_encoder(model), [""])
    arch = CaptionTableArch(architecture_from_manifest(fields), context, null)
    return model, tensors, arch, context, null


@torch.no_grad()
def test_the_jobs_stage_1_student_is_the_teacher_at_every_w_and_keeps_the_checkpoint_keys():
    model, tensors, arch, context, null = teacher()
    assert arch.num_classes == 2 and arch.null_class and arch.state_shapes() == arch.inner.state_shapes()
    net = arch.build(dropout=0.0)
    net.load_state_dict(tensors)  # the checkpoint's "unet." keys fit the table net as they are
    student_arch = arch.with_guidance_embedding(16)
    student = student_arch.build(dropout=0.0)
    fresh = student.state_dict()
    student.load_state_dict({**fresh, **tensors})  # what new_guided_student_state does
    assert float(student.unet.time_embedding.cond_proj.weight.abs().max()) == 0.0
    assert set(fresh) - set(tensors) == {"unet.time_embedding.cond_proj.weight"}
    y = torch.tensor([0, 1, 2])  # 2 = the empty prompt
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    lam = model.schedule.logsnr(torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)).float()
    want = net(z, lam, y)
    for w in (0.0, 1.5, 4.0):
        got = student(z, lam, y, torch.full((3,), w))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@torch.no_grad()
def test_stage_1_on_a_discrete_teacher_draws_t_from_the_first_timestep_and_targets_the_text_guided_model():
    model, tensors, arch, context, null = teacher()
    net = arch.build(dropout=0.0)
    net.load_state_dict(tensors)
    loss = GuidanceLoss(Denoiser(net, parameterization="eps"), null_label=2, w_min=0.5, w_max=3.0,
                        weighting="snr_plus_one", schedule=model.schedule, t_min=1e-3)
    x = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1, 0])
    z, lam, w, x_w = loss.targets(x, y, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = 1e-3 + (1 - 1e-3) * torch.rand(4, generator=g)
    eps = torch.randn(x.shape, generator=g)
    w_ref = 0.5 + 2.5 * torch.rand(4, generator=g)
    lam_ref = model.schedule.logsnr_unchecked(t)
    alpha, sigma = (v[:, None, None, None] for v in alpha_sigma(lam_ref))
    assert torch.equal(w, w_ref) and torch.equal(lam, lam_ref) and float(t.min()) >= 1e-3
    torch.testing.assert_close(z, alpha * x + sigma * eps, rtol=0, atol=0)
    text = Denoiser(TextUNetNet(net.unet, schedule=model.schedule), parameterization="eps")
    want, _ = TextGuidedDenoiser(text, context=context[y], null_context=null, w=w)(z, lam)
    torch.testing.assert_close(x_w, want, rtol=1e-6, atol=1e-6)
    via_labels, _ = GuidedDenoiser(Denoiser(net, parameterization="eps"), y=y, w=w, null_label=2)(z, lam)
    torch.testing.assert_close(x_w, via_labels, rtol=0, atol=0)


def test_encoded_data_reaches_the_rounds_as_class_labelled_latents_with_their_table(tmp_path):
    from pd_core import jobs, text_to_image
    from pd_core.config import load_config
    from pd_core.data.class_captions import write_caption_folder
    from pd_core.store import StoreError

    images = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    write_caption_folder(images, ["a photo of a bag", "", "a photo of a coat"] * 2, str(tmp_path / "data"))
    cfg = load_config(preset="smoke", overrides=[f"pipeline.teacher_uri=diffusers:{saved_sd_pipeline()}",
                                                 f"storage.root={tmp_path / 'store'}", "data.name=captions",
                                                 f"data.url={tmp_path / 'data'}", "data.limit=5",
                                                 "eval.enabled=false"])
    store = jobs.open_store(cfg)
    with pytest.raises(StoreError, match="encoded-data.json does not exist"):
        jobs.load_train_data(cfg, store)
    info = text_to_image.encode_data(cfg, store)
    data = jobs.load_train_data(cfg, store)
    assert isinstance(data, text_to_image.CaptionLatents) and info.count == 5 and info.captions == 3  # data.limit
    assert info.key.endswith("-n5")  # the limit is in the encoded data's key: another limit is another encoding
    assert data.images.shape == (5, 4, 4, 4) and data.labels.tolist() == [0, 1, 2, 0, 1] and data.num_classes == 3
    assert text_to_image.encoded_sha256(cfg, store) == info.sha256 == data.encoded_sha256
    torch.testing.assert_close(data.caption_embeds[1:2], data.null_embed)  # the empty caption is the null prompt
    again = text_to_image.encode_data(cfg, store)
    assert again.reused and again.sha256 == info.sha256


def test_unguided_distillation_of_a_text_teacher_runs_the_rounds_from_the_teacher_without_stage_1(tmp_path):
    from pd_core import jobs, lineage, text_to_image
    from pd_core.config import load_config
    from pd_core.data.class_captions import write_caption_folder
    from pd_core.models import load_model

    images = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    write_caption_folder(images, ["a photo of a bag", ""] * 2, str(tmp_path / "data"))
    cfg = load_config(preset="smoke", overrides=[f"pipeline.teacher_uri=diffusers:{saved_sd_pipeline()}",
                                                 f"storage.root={tmp_path / 'store'}", "data.name=captions",
                                                 f"data.url={tmp_path / 'data'}", "distill.start_steps=2",
                                                 "distill.updates_per_round=2", "distill.batch_size=2",
                                                 "diffusion.weighting=snr_plus_one", "eval.enabled=false"])
    store = jobs.open_store(cfg)
    teacher = jobs.ensure_teacher(cfg, store)
    text_to_image.encode_data(cfg, store)
    student = jobs.run_round(cfg, store, round_index=1, teacher=teacher)
    manifest = store.read_manifest(student.key)
    assert student.trained and student.steps == 1 and manifest["parent_sha256"] == teacher.sha256
    assert manifest["parameterization"] == "v" and manifest["diffusers_unet2d_condition"]["time_cond_proj_dim"] is None
    assert manifest["text_to_image"] == store.read_manifest(teacher.key)["text_to_image"]
    assert "guidance" not in manifest["settings"] and "encoded_data" in manifest["settings"]
    # a re-imported teacher of the same UNet keeps its sha256: the folder's hash (its scheduler) is in the lineage
    assert manifest["settings"]["teacher_folder"] == manifest["text_to_image"]["sha256"]
    encoded = manifest["settings"]["encoded_data"]
    other_folder = lineage.round_lineage(cfg, round_index=1, teacher_steps=2, parent_sha256=teacher.sha256,
                                         student_parameterization="v", encoded_data=encoded, teacher_folder="cd" * 32)
    assert other_folder.settings_hash != manifest["settings_hash"]
    assert load_model(store, student.key).architecture.image_shape == (4, 4, 4)
    again = jobs.run_round(cfg, store, round_index=1, teacher=teacher)
    assert not again.trained and again.sha256 == student.sha256


def test_the_text_students_guidance_embedding_is_the_only_parameter_at_the_embedding_lr_scale():
    from pd_core.config import load_config
    from pd_core.train import resolve_runtime
    from pd_core.train.phases import new_guided_student_state

    model, tensors, arch, context, null = teacher()
    cfg = load_config(preset="smoke-guided", overrides=["guidance.embedding_lr_scale=7"])
    state = new_guided_student_state(teacher_weights=tensors, arch=arch.with_guidance_embedding(16),
                                     distill_cfg=cfg.distill, guidance_cfg=cfg.guidance,
                                     runtime=resolve_runtime(cfg.runtime), seed=0)
    names = {id(p): n for n, p in state.model.named_parameters()}
    scaled = [names[id(p)] for g in state.optimizer.param_groups if g["lr_scale"] == 7.0 for p in g["params"]]
    assert scaled == ["unet.time_embedding.cond_proj.weight"]
    assert sum(len(g["params"]) for g in state.optimizer.param_groups) == len(names)  # the rest at scale 1
    assert {g["lr_scale"] for g in state.optimizer.param_groups} == {1.0, 7.0}
