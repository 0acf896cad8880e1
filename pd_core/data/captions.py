"""Image-caption pairs in Hugging Face's ``imagefolder`` convention, local or any fsspec URL.

A folder holds images and ``metadata.jsonl``: one JSON object a line with ``file_name`` (a path
relative to the folder, never leaving it) and ``text`` (the caption; "" is an empty caption, the
null prompt of classifier-free guidance). With split folders, ``<root>/<split>/metadata.jsonl``.
Images are decoded with Pillow as RGB (a text-to-image VAE takes 3 channels) and fitted to
``size`` with :mod:`pd_core.data.shaping` (u / 127.5 - 1). Everything is bounded: the metadata
file's size and line count, each caption's length, each image file's size.

The data hash is h = sha256(metadata bytes || sha256(image_1 bytes) || ... || sha256(image_N bytes))
(the rows in metadata order, the first ``limit`` when given): what decides the encoded latents
besides the encoders, the image size and the seed. :func:`load_captions` decodes the folder whole
(N, 3, size, size), for bounded reads (an evaluation's test split). :func:`scan_captions` reads and
hashes the bytes alone (each image's header checked: readable, and fits ``size``) and
:meth:`CaptionFiles.batches` then decodes B images at a time, each file's bytes checked against the
scan's sha256: the same h and, batch by batch, bit-identical images to ``load_captions``, with memory
bounded by B decoded images instead of N.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
from torch import Tensor

from pd_core.data.common import DatasetError
from pd_core.data.files import _local, join_url
from pd_core.data.shaping import check_fits, fit_to_size, to_unit_range

METADATA_NAME = "metadata.jsonl"
MAX_METADATA_BYTES = 64 << 20
MAX_EXAMPLES = 1_000_000
MAX_CAPTION_CHARS = 2000
MAX_IMAGE_BYTES = 32 << 20


@dataclass(frozen=True)
class CaptionData:
    """Images (N, 3, size, size) in [-1, 1], their captions, and the sha256 of everything read."""

    images: Tensor
    captions: tuple[str, ...]
    sha256: str
    source: str

    @property
    def count(self) -> int:
        return int(self.images.shape[0])

    def batches(self, batch: int) -> Iterator[Tensor]:
        """The images (B, 3, size, size) in order, ``batch`` at a time (the last batch the rest)."""
        for start in range(0, self.count, batch):
            yield self.images[start:start + batch]


@dataclass(frozen=True)
class CaptionFiles:
    """A folder's captions and the sha256 of everything read (as :class:`CaptionData`'s), its images not decoded:
    :meth:`batches` reads and decodes them ``batch`` at a time."""

    captions: tuple[str, ...]
    sha256: str
    source: str
    size: int
    names: tuple[str, ...] = field(repr=False)
    digests: tuple[bytes, ...] = field(repr=False)  # each image's sha256 as the scan read it
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    folder: str = field(repr=False)

    @property
    def count(self) -> int:
        return len(self.names)

    def batches(self, batch: int) -> Iterator[Tensor]:
        """The images (B, 3, size, size) in [-1, 1], in order, ``batch`` at a time (the last batch the rest); at most
        ``batch`` decoded images held. DatasetError naming the file when its bytes changed since the scan."""
        for start in range(0, self.count, batch):
            images = []
            for name, digest in zip(self.names[start:start + batch], self.digests[start:start + batch], strict=True):
                url = join_url(self.source, name)
                raw = _read(self.fs, f"{self.folder}/{name}", limit=MAX_IMAGE_BYTES, url=url)
                if hashlib.sha256(raw).digest() != digest:
                    raise DatasetError(f"{url} changed while the folder was being encoded; rerun when it is stable")
                images.append(_image(raw, size=self.size, url=url))
            yield torch.cat(images)


def _metadata_url(root: str, split: str, fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, str]:
    """(folder path, folder URL) holding metadata.jsonl: ``<root>/<split>/`` when it has one, else ``<root>``."""
    if fs.isfile(f"{path.rstrip('/')}/{split}/{METADATA_NAME}"):
        return f"{path.rstrip('/')}/{split}", join_url(root, split)
    if fs.isfile(f"{path.rstrip('/')}/{METADATA_NAME}"):
        return path.rstrip("/"), root
    raise DatasetError(f"{join_url(root, METADATA_NAME)} does not exist: an image-caption folder needs a "
                       f"metadata.jsonl with one {{\"file_name\": ..., \"text\": ...}} per line")


def _read(fs: fsspec.AbstractFileSystem, path: str, *, limit: int, url: str) -> bytes:
    try:
        size = int(fs.size(path))
        if size > limit:
            raise DatasetError(f"{url} is {size} bytes, more than the {limit} allowed; is it the right file?")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise DatasetError(f"{url} does not exist (named in {METADATA_NAME})") from None
    except OSError as err:
        raise DatasetError(f"{url} could not be read: {err}") from None


def parse_metadata(raw: bytes, *, source: str) -> list[tuple[str, str]]:
    """(file_name, text) per line of a metadata.jsonl; DatasetError naming the line and the field."""
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DatasetError(f"{source} is not UTF-8 text ({err})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(rows) >= MAX_EXAMPLES:
            raise DatasetError(f"{source} has more than {MAX_EXAMPLES} examples; split the data set")
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{source} line {number} is not JSON ({err})") from None
        name, text = (doc.get("file_name"), doc.get("text")) if isinstance(doc, dict) else (None, None)
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{source} line {number}: file_name must be a non-empty string (the image's path "
                               f"relative to the folder)")
        if not isinstance(text, str) or len(text) > MAX_CAPTION_CHARS:
            raise DatasetError(f"{source} line {number}: text must be a string of at most {MAX_CAPTION_CHARS} "
                               f"characters (\"\" for an empty caption)")
        clean = posixpath.normpath(name)
        if clean.startswith(("../", "/")) or clean == ".." or "\\" in name or "://" in name:
            raise DatasetError(f"{source} line {number}: file_name {name!r} leaves the folder; give a path inside it")
        rows.append((clean, text))
    if not rows:
        raise DatasetError(f"{source} lists no images")
    return rows


def _decode(raw: bytes, *, url: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            return np.asarray(img.convert("RGB")).transpose(2, 0, 1)  # (3, H, W) uint8
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"{url} is not a readable image ({exc}); remove it from {METADATA_NAME}") from None


def _image(raw: bytes, *, size: int, url: str) -> Tensor:
    """(1, 3, size, size) in [-1, 1] of one image file's bytes."""
    return fit_to_size(to_unit_range(_decode(raw, url=url)[None]), size=size, source=url)


def _check_header(raw: bytes, *, size: int, url: str) -> None:
    """DatasetError unless the bytes open as an image (header only, pixels not decoded) that fits ``size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"{url} is not a readable image ({exc}); remove it from {METADATA_NAME}") from None
    check_fits(height, width, size=size, source=url)


def has_split(url: str, split: str) -> bool:
    """Whether the folder at ``url`` has its own ``<split>/metadata.jsonl`` (else its flat folder serves each split)."""
    try:
        fs, path = fsspec.core.url_to_fs(_local(url))
        return bool(fs.isfile(f"{path.rstrip('/')}/{split}/{METADATA_NAME}"))
    except (ValueError, ImportError, OSError):
        return False


def _open_metadata(url: str, split: str):
    """(fs, folder path, folder URL, metadata URL, metadata bytes) of the split's folder at ``url``."""
    try:
        fs, path = fsspec.core.url_to_fs(_local(url))
    except (ValueError, ImportError, OSError) as err:
        raise DatasetError(f"{url}: cannot open this location ({err})") from None
    folder, folder_url = _metadata_url(url, split, fs, path)
    meta_url = join_url(folder_url, METADATA_NAME)
    raw_meta = _read(fs, f"{folder}/{METADATA_NAME}", limit=MAX_METADATA_BYTES, url=meta_url)
    return fs, folder, folder_url, meta_url, raw_meta


def load_caption_texts(url: str, *, split: str = "train") -> tuple[str, ...]:
    """The captions of the folder at ``url`` in order, read from its metadata.jsonl alone (no image is read)."""
    _, _, _, meta_url, raw_meta = _open_metadata(url, split)
    return tuple(text for _, text in parse_metadata(raw_meta, source=meta_url))


def load_captions(url: str, *, size: int, split: str = "train", limit: int | None = None) -> CaptionData:
    """The image-caption pairs of the folder at ``url`` (module docstring), images fitted to ``size``; only the
    first ``limit`` rows of its metadata.jsonl (their images alone are read and hashed) when given. All N images
    are decoded into one tensor: for bounded reads; :func:`scan_captions` streams."""
    fs, folder, folder_url, meta_url, raw_meta = _open_metadata(url, split)
    rows = parse_metadata(raw_meta, source=meta_url)[:limit]
    digest = hashlib.sha256(raw_meta)
    images = []
    for name, _ in rows:
        image_url = join_url(folder_url, name)
        raw = _read(fs, f"{folder}/{name}", limit=MAX_IMAGE_BYTES, url=image_url)
        digest.update(hashlib.sha256(raw).digest())
        images.append(_image(raw, size=size, url=image_url))
    return CaptionData(images=torch.cat(images), captions=tuple(text for _, text in rows), sha256=digest.hexdigest(),
                       source=folder_url)


def scan_captions(url: str, *, size: int, split: str = "train", limit: int | None = None) -> CaptionFiles:
    """The folder at ``url`` as :func:`load_captions` reads it (same rows, same sha256), its image bytes read and
    hashed one at a time and not decoded (each header checked); :meth:`CaptionFiles.batches` decodes them."""
    fs, folder, folder_url, meta_url, raw_meta = _open_metadata(url, split)
    rows = parse_metadata(raw_meta, source=meta_url)[:limit]
    digest, digests = hashlib.sha256(raw_meta), []
    for name, _ in rows:
        image_url = join_url(folder_url, name)
        raw = _read(fs, f"{folder}/{name}", limit=MAX_IMAGE_BYTES, url=image_url)
        digests.append(hashlib.sha256(raw).digest())
        digest.update(digests[-1])
        _check_header(raw, size=size, url=image_url)
    return CaptionFiles(captions=tuple(text for _, text in rows), sha256=digest.hexdigest(), source=folder_url,
                        size=size, names=tuple(name for name, _ in rows), digests=tuple(digests), fs=fs, folder=folder)
