"""Importing a Stable Diffusion-style pipeline folder: every component checked before anything heavy loads,
read back exactly as diffusers and transformers load it, hashed into one lineage; hostile folders refused
with one line naming the component and field, nothing opened, nothing written.

The folder is a tiny randomly initialised pipeline saved with save_pretrained (tests/sd_models.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pd_core.config import ConfigError, load_config
from pd_core.interop.sd_folder import (
    DiffusersImportError,
    component_hashes,
    is_text_to_image_folder,
    preflight_text_to_image,
    read_text_to_image,
    source_sha256,
)
from pd_core.interop.sd_pipeline import (
    build_text_encoder,
    build_tokenizer,
    build_vae,
    encode_prompts,
    read_text_to_image_model,
)
from pd_core.interop.sd_unet import build_cond_unet
from tests.diffusers_models import save_teacher
from tests.sd_models import load_sd_pipeline, one_thread, saved_sd_pipeline, tiny_vae


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()

PROMPTS = ["a photo of a sneaker", "a photo of a bag", ""]


def sd_cfg(folder: Path, store: Path):
    return load_config(preset="smoke", overrides=[f"pipeline.teacher_uri=diffusers:{folder}",
                                                  f"storage.root={store}"])


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_a_saved_pipeline_folder_is_checked_and_every_file_a_load_reads_is_hashed():
    folder = saved_sd_pipeline()
    tti = read_text_to_image(f"diffusers:{folder}")
    assert tti.pipeline_class == "StableDiffusionPipeline" and tti.parameterization == "eps"
    assert (tti.latent_size, tti.vae_scale_factor, tti.image_size) == (4, 2, 8)
    assert tti.files["unet"] == ("config.json", "diffusion_pytorch_model.safetensors")
    assert tti.files["text_encoder"] == ("config.json", "model.safetensors")
    hashes = component_hashes(tti)  # streamed
    for component, files in hashes.items():
        for name, sha in files.items():
            assert sha == hashlib.sha256((folder / component / name).read_bytes()).hexdigest()
    model = read_text_to_image_model(f"diffusers:{folder}")
    assert model.hashes == hashes and model.source_sha256 == source_sha256(hashes)
    assert is_text_to_image_folder(f"diffusers:{folder}")


def test_the_lineage_changes_with_any_component_and_only_with_it(tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(saved_sd_pipeline(), folder)
    before = source_sha256(component_hashes(read_text_to_image(str(folder))))
    assert source_sha256(component_hashes(read_text_to_image(str(folder)))) == before  # deterministic
    tiny_vae(seed=7).save_pretrained(str(folder / "vae"))  # another VAE, same config
    after = component_hashes(read_text_to_image(str(folder)))
    assert source_sha256(after) != before
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**json.loads((folder / "scheduler" / "scheduler_config.json").read_text()), "beta_end": 0.02}))
    assert source_sha256(component_hashes(read_text_to_image(str(folder)))) != source_sha256(after)


def test_the_imported_components_are_what_stock_diffusers_loads_and_prompts_embed_alike():
    folder = saved_sd_pipeline()
    pipe = load_sd_pipeline(folder)
    model = read_text_to_image_model(f"diffusers:{folder}")
    ours = {"unet": build_cond_unet(model.configs["unet"], model.weights["unet"]), "vae": build_vae(model),
            "text_encoder": build_text_encoder(model)}
    for name, module in ours.items():
        want = getattr(pipe, name).state_dict()
        got = module.state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    tokenizer = build_tokenizer(model)
    assert tokenizer(PROMPTS).input_ids == pipe.tokenizer(PROMPTS).input_ids
    emb = encode_prompts(tokenizer, ours["text_encoder"], PROMPTS)
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert emb.shape == (3, 12, 32) and torch.equal(emb, ref)
    assert float((emb[0] - emb[1]).abs().max()) > 1e-3  # the prompt matters: not a vacuous comparison
    assert model.scaling_factor == pipe.vae.config.scaling_factor


def test_a_pixel_space_ddpm_folder_is_not_a_text_to_image_folder(tmp_path):
    folder = save_teacher(tmp_path / "ddpm")
    assert not is_text_to_image_folder(f"diffusers:{folder}")
    with pytest.raises(DiffusersImportError, match="_class_name 'DDPMPipeline' is not a text-to-image pipeline"):
        read_text_to_image(str(folder))


def _armed_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))
    return pickle.dumps(Payload())


def _pickle_only(component: str, weights: str, pickle_name: str):
    def breaks(folder: Path, outside: Path) -> None:
        (folder / component / weights).unlink()
        (folder / component / pickle_name).write_bytes(_armed_pickle(outside / "pwned"))
    return breaks


def _link_out(path: str):
    def breaks(folder: Path, outside: Path) -> None:
        target = outside / Path(path).name
        shutil.move(folder / path, target)
        os.symlink(target, folder / path)
    return breaks


def _edit(path: str, **changes):
    def breaks(folder: Path, _outside: Path) -> None:
        doc = json.loads((folder / path).read_text())
        doc.update(changes)
        (folder / path).write_text(json.dumps(doc))
    return breaks


def _missing_component(folder: Path, _outside: Path) -> None:
    shutil.rmtree(folder / "vae")
    index = json.loads((folder / "model_index.json").read_text())
    del index["vae"]
    (folder / "model_index.json").write_text(json.dumps(index))


HOSTILE = {  # case -> (break the folder, the component named, what the one line says)
    "unet-pickle-only": (_pickle_only("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                         "unet", "is a pickle, which can run code when loaded and is never opened"),
    "text-encoder-pickle-only": (_pickle_only("text_encoder", "model.safetensors", "pytorch_model.bin"),
                                 "text_encoder", "is a pickle"),
    "weights-linked-out": (_link_out("vae/diffusion_pytorch_model.safetensors"), "vae",
                           "outside the pipeline folder"),
    "component-linked-out": (_link_out("text_encoder"), "text_encoder", "outside the pipeline folder"),
    "tokenizer-linked-out": (_link_out("tokenizer/tokenizer.json"), "tokenizer", "outside the pipeline folder"),
    "oversize-config": (lambda f, o: (f / "unet" / "config.json").write_bytes(b" " * (2 << 20)), "unet",
                        "more than the 1048576 allowed"),
    "missing-component": (_missing_component, "vae", "names no vae component"),
    "missing-component-folder": (lambda f, o: shutil.rmtree(f / "scheduler"), "scheduler", "does not exist"),
    "no-tokenizer-files": (lambda f, o: (f / "tokenizer" / "tokenizer.json").unlink(), "tokenizer",
                           "holds neither tokenizer.json nor vocab.json"),
    "cross-attention-misfit": (_edit("unet/config.json", cross_attention_dim=64), "unet",
                               "cross_attention_dim 64 must equal the text encoder's hidden_size 32"),
    "latent-misfit": (_edit("vae/config.json", latent_channels=8), "unet", "in_channels 4 must equal"),
    "sdxl-unet": (_edit("unet/config.json", addition_embed_type="text_time"), "unet", "addition_embed_type"),
    "zero-snr": (_edit("scheduler/scheduler_config.json", rescale_betas_zero_snr=True), "scheduler",
                 "rescale_betas_zero_snr"),
    "prediction": (_edit("scheduler/scheduler_config.json", prediction_type="flow"), "scheduler",
                   "prediction_type 'flow'"),
    "not-a-clip-encoder": (_edit("text_encoder/config.json", architectures=["T5EncoderModel"],
                                 model_type="t5"), "text_encoder", "is not CLIPTextModel"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_pipeline_folder_is_refused_with_one_line_naming_the_component_and_nothing_written(tmp_path, case):
    breaks, component, message = HOSTILE[case]
    folder, outside = tmp_path / "pipe", tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(saved_sd_pipeline(), folder)
    breaks(folder, outside)
    before, before_outside = snapshot(folder), snapshot(outside)
    with pytest.raises(ConfigError) as err:
        preflight_text_to_image(sd_cfg(folder, tmp_path / "store"))
    text = str(err.value)
    assert text.startswith(f"pipeline.teacher_uri: {component}: ") and message in text and "\n" not in text, text
    with pytest.raises(DiffusersImportError, match=message.split(" (")[0][:40]):
        read_text_to_image_model(f"diffusers:{folder}")  # the loader checks the same way before reading
    assert not (outside / "pwned").exists()  # no pickle ever ran
    assert snapshot(folder) == before and snapshot(outside) == before_outside
    assert not (tmp_path / "store").exists()  # nothing written


def test_a_pipeline_folder_behind_an_fsspec_url_reads_like_a_local_one(tmp_path):
    import fsspec

    folder = saved_sd_pipeline()
    fs = fsspec.filesystem("memory")
    for path in folder.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"/pd-tests-sd/{path.relative_to(folder).as_posix()}", path.read_bytes())
    try:
        remote = read_text_to_image_model("diffusers:memory://pd-tests-sd")
        local = read_text_to_image_model(f"diffusers:{folder}")
        assert remote.hashes == local.hashes and remote.source == "memory://pd-tests-sd"
        assert all(torch.equal(remote.weights["unet"][k], v) for k, v in local.weights["unet"].items())
        assert build_tokenizer(remote)(PROMPTS).input_ids == build_tokenizer(local)(PROMPTS).input_ids
    finally:
        fs.rm("/pd-tests-sd", recursive=True)


def test_a_weights_file_over_the_bound_is_refused_before_it_is_read(monkeypatch):
    from pd_core.interop import sd_folder

    size = (saved_sd_pipeline() / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    monkeypatch.setattr(sd_folder, "MAX_WEIGHTS_BYTES", size - 1)
    with pytest.raises(DiffusersImportError, match=rf"^unet: .*diffusion_pytorch_model.safetensors is {size} bytes, "
                                                   rf"more than the {size - 1} allowed"):
        read_text_to_image(str(saved_sd_pipeline()))


def test_an_imported_teacher_records_the_folder_as_an_absolute_path_with_the_options_to_read_it_again(
        tmp_path, monkeypatch):
    """A relative local path is recorded absolute (pd sample and pd export read it from anywhere), with the store's
    fsspec options, which folder_of hands to the read (observed by wrapping the real reader)."""
    from pd_core import text_to_image
    from pd_core.store import CheckpointStore

    shutil.copytree(saved_sd_pipeline(), tmp_path / "pipe")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(preset="smoke", overrides=["pipeline.teacher_uri=diffusers:pipe", "data.name=captions",
                                                 "data.url=data", "data.image_size=8", "eval.enabled=false",
                                                 f"storage.root={tmp_path / 'store'}",
                                                 "storage.storage_options={auto_mkdir: false}"])
    store = CheckpointStore(cfg.storage.root)
    info = text_to_image.import_text_teacher(cfg, store, uri="diffusers:pipe")
    recorded = store.read_manifest(info.key)["text_to_image"]
    assert recorded["source"] == str(tmp_path / "pipe") and os.path.isabs(recorded["source"])
    assert recorded["storage_options"] == {"auto_mkdir": False}
    seen, real = [], text_to_image.read_text_to_image_model
    monkeypatch.setattr(text_to_image, "read_text_to_image_model",
                        lambda uri, storage_options=None: seen.append(storage_options) or real(uri, storage_options=
                                                                                                 storage_options))
    monkeypatch.chdir(tmp_path / "store")  # elsewhere: the absolute path still reads
    assert text_to_image.folder_of(store.read_manifest(info.key)).source == str(tmp_path / "pipe")
    assert seen == [{"auto_mkdir": False}]
