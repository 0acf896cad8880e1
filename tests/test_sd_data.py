"""Image-caption data (imagefolder + metadata.jsonl) read with bounds, encoded once with the teacher's VAE and text
encoder as diffusers' training recipe does, kept in the store under a key naming the data and the encoders; the
encode job streams the folder (hashed first, decoded one batch at a time) to the same tensors as the whole read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pd_core.data.captions import load_captions, scan_captions
from pd_core.data.common import DatasetError
from pd_core.interop import sd_latents
from pd_core.interop.sd_latents import encode_captions, encoders_sha256, ensure_encoded
from pd_core.interop.sd_pipeline import read_text_to_image_model
from pd_core.store import CheckpointStore
from tests.sd_models import load_sd_pipeline, one_thread, saved_sd_pipeline, tiny_vae


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()

CAPTIONS = ["a photo of a sneaker", "a photo of a bag", "", "a photo of a sneaker", "a photo of a coat"]


def write_caption_folder(folder: Path, captions=CAPTIONS, *, split: str | None = None) -> Path:
    """Five 8x8 images (RGB and grayscale) and their metadata.jsonl; returns the folder."""
    base = folder / split if split else folder
    (base / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, text in enumerate(captions):
        pixels = rng.integers(0, 256, size=(8, 8, 3) if i % 2 else (8, 8), dtype=np.uint8)
        Image.fromarray(pixels).save(base / "img" / f"{i}.png")
        lines.append(json.dumps({"file_name": f"img/{i}.png", "text": text}))
    (base / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_captions_are_read_as_rgb_in_the_unit_range_with_a_hash_of_every_byte(tmp_path):
    folder = write_caption_folder(tmp_path / "data", split="train")
    data = load_captions(str(folder), size=8)
    assert data.images.shape == (5, 3, 8, 8) and data.captions == tuple(CAPTIONS)
    gray = np.asarray(Image.open(folder / "train" / "img" / "0.png"))
    assert torch.equal(data.images[0, 1], torch.tensor(gray).float() / 127.5 - 1)  # grayscale -> RGB, u/127.5 - 1
    assert load_captions(str(folder), size=8).sha256 == data.sha256
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "train" / "img" / "0.png")
    assert load_captions(str(folder), size=8).sha256 != data.sha256


BAD = {
    "no-metadata": (lambda f: (f / "metadata.jsonl").unlink(), "metadata.jsonl does not exist"),
    "no-file-name": (lambda f: (f / "metadata.jsonl").write_text('{"text": "a"}\n'), "line 1: file_name must be"),
    "escapes": (lambda f: (f / "metadata.jsonl").write_text('{"file_name": "../x.png", "text": "a"}\n'),
                "leaves the folder"),
    "not-json": (lambda f: (f / "metadata.jsonl").write_text('{"file_name": "img/0.png", "text": \n'),
                 "line 1 is not JSON"),
    "missing-image": (lambda f: (f / "img" / "3.png").unlink(), "img/3.png does not exist"),
    "not-an-image": (lambda f: (f / "img" / "2.png").write_bytes(b"nope"), "img/2.png is not a readable image"),
    "long-caption": (lambda f: (f / "metadata.jsonl").write_text(
        json.dumps({"file_name": "img/0.png", "text": "a" * 3000}) + "\n"), "text must be a string of at most"),
    "too-big": (lambda f: Image.fromarray(np.zeros((12, 12), dtype=np.uint8)).save(f / "img" / "4.png"),
                "img/4.png: images are 12x12 and cannot be made 8x8"),
}


@pytest.mark.parametrize("read", [load_captions, scan_captions])
@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_caption_folder_is_refused_with_one_line(tmp_path, case, read):
    breaks, message = BAD[case]
    folder = write_caption_folder(tmp_path / "data")
    breaks(folder)
    with pytest.raises(DatasetError) as err:
        read(str(folder), size=8)  # the scan checks each image's header: refused before anything is encoded
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@torch.no_grad()
def test_encoding_is_the_vae_sample_times_scaling_factor_and_the_pipelines_prompt_embeddings(tmp_path):
    model = read_text_to_image_model(str(saved_sd_pipeline()))
    data = load_captions(str(write_caption_folder(tmp_path / "data")), size=8)
    tensors = encode_captions(model, data, seed=3, batch=2)
    pipe = load_sd_pipeline(saved_sd_pipeline())
    g = torch.Generator().manual_seed(3)
    want = torch.cat([pipe.vae.encode(data.images[i:i + 2]).latent_dist.sample(generator=g) for i in (0, 2, 4)])
    assert tensors["latents"].shape == (5, 4, 4, 4)
    assert torch.equal(tensors["latents"], want * pipe.vae.config.scaling_factor)
    distinct, _ = pipe.encode_prompt(list(dict.fromkeys(CAPTIONS)), "cpu", 1, False)
    assert tensors["caption_embeds"].shape[0] == 4  # each distinct caption once, encoded two at a time here
    torch.testing.assert_close(tensors["caption_embeds"], distinct, rtol=1e-5, atol=1e-6)
    assert tensors["caption_index"].tolist() == [0, 1, 2, 0, 3]
    assert torch.equal(tensors["null_embed"], pipe.encode_prompt([""], "cpu", 1, False)[0])


def test_encoded_data_is_reused_only_for_the_same_data_and_encoders(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    teacher = tmp_path / "teacher"
    shutil.copytree(saved_sd_pipeline(), teacher)
    model = read_text_to_image_model(str(teacher))
    folder = write_caption_folder(tmp_path / "data")
    data = load_captions(str(folder), size=8)
    first = ensure_encoded(store, model, data, size=8, seed=0)
    again = ensure_encoded(store, model, data, size=8, seed=0)
    assert not first.reused and again.reused and again.key == first.key
    assert torch.equal(again.latents, first.latents)
    assert torch.equal(again.prompt_embeds(torch.tensor([3])), first.caption_embeds[:1])
    (folder / "metadata.jsonl").write_text((folder / "metadata.jsonl").read_text().replace("bag", "hat"))
    changed = ensure_encoded(store, model, load_captions(str(folder), size=8), size=8, seed=0)
    assert not changed.reused and changed.key != first.key  # another data set: encoded again
    tiny_vae(seed=9).save_pretrained(str(teacher / "vae"))
    other = read_text_to_image_model(str(teacher))
    assert encoders_sha256(other) != encoders_sha256(model)
    fresh = ensure_encoded(store, other, data, size=8, seed=0)
    assert not fresh.reused and fresh.key != first.key  # another VAE: never the old latents
    assert not torch.allclose(fresh.latents, first.latents)


def test_a_caption_folder_behind_an_fsspec_url_reads_like_a_local_one(tmp_path):
    import fsspec

    folder = write_caption_folder(tmp_path / "data")
    fs = fsspec.filesystem("memory")
    for path in folder.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"/pd-tests-captions/{path.relative_to(folder).as_posix()}", path.read_bytes())
    try:
        remote, local = load_captions("memory://pd-tests-captions", size=8), load_captions(str(folder), size=8)
        assert remote.sha256 == local.sha256 and remote.captions == local.captions
        assert torch.equal(remote.images, local.images)
    finally:
        fs.rm("/pd-tests-captions", recursive=True)


def test_a_scanned_folder_hashes_like_the_whole_read_and_decodes_lazily_at_most_a_batch_at_a_time(tmp_path):
    folder = write_caption_folder(tmp_path / "data")
    whole, scan = load_captions(str(folder), size=8, limit=4), scan_captions(str(folder), size=8, limit=4)
    assert (scan.sha256, scan.captions, scan.count, scan.source) == (whole.sha256, whole.captions, 4, whole.source)
    batches = list(scan.batches(3))
    assert [b.shape[0] for b in batches] == [3, 1] and torch.equal(torch.cat(batches), whole.images)
    stream = scan.batches(2)
    assert torch.equal(next(stream), whole.images[:2])  # read so far: two images; the third is read when asked for
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "img" / "2.png")
    with pytest.raises(DatasetError, match="img/2.png changed while the folder was being encoded"):
        next(stream)  # bytes that differ from the hash in the key are never encoded under it


@torch.no_grad()
def test_the_encode_job_streams_batches_of_64_to_the_whole_tensor_encoding_bit_for_bit(tmp_path, monkeypatch,
                                                                                         caplog):
    from pd_core.data.class_captions import write_caption_folder as write_pngs

    images = torch.randint(0, 256, (70, 3, 8, 8), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    folder = write_pngs(images, CAPTIONS * 14, str(tmp_path / "data"))
    model = read_text_to_image_model(str(saved_sd_pipeline()))
    seen, build_vae = [], sd_latents.build_vae

    def spied_vae(m):  # the real VAE, its encoder's input batch sizes recorded
        vae = build_vae(m)
        vae.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
        return vae

    monkeypatch.setattr(sd_latents, "build_vae", spied_vae)
    whole = load_captions(folder, size=8)
    caplog.set_level("INFO", logger="pd_core.interop.sd_latents")
    streamed = ensure_encoded(CheckpointStore(str(tmp_path / "a")), model, scan_captions(folder, size=8), size=8,
                              seed=5)
    assert seen == [64, 6]  # never more than a batch of images decoded or encoded at once
    assert [r.getMessage().split(",")[0] for r in caplog.records if "img/s" in r.getMessage()] == [
        "encode: 70/70 images (100.0%)"] and "ETA 0s" in caplog.text
    reference = ensure_encoded(CheckpointStore(str(tmp_path / "b")), model, whole, size=8, seed=5)
    assert streamed.key == reference.key and not streamed.reused
    manifests = [CheckpointStore(str(tmp_path / s)).read_manifest(streamed.key) for s in "ab"]
    assert manifests[0]["sha256"] == manifests[1]["sha256"]  # the stored bytes are the same
    for name in ("latents", "caption_index", "caption_embeds", "null_embed"):
        assert torch.equal(getattr(streamed, name), getattr(reference, name)), name
    pipe, g = load_sd_pipeline(saved_sd_pipeline()), torch.Generator().manual_seed(5)  # independent: diffusers' VAE
    want = torch.cat([pipe.vae.encode(whole.images[i:i + 64]).latent_dist.sample(generator=g) for i in (0, 64)])
    assert torch.equal(streamed.latents, want * pipe.vae.config.scaling_factor)  # same ops, same batches: exact
    seen.clear()
    assert ensure_encoded(CheckpointStore(str(tmp_path / "a")), model, scan_captions(folder, size=8), size=8,
                          seed=5).reused and seen == []  # a reuse decodes and encodes nothing
