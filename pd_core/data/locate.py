"""Finding the IDX / CIFAR-10 files of a DataConfig: data.url, else the default places, else a download.

Roots are tried in order (``data.url``; otherwise Fashion-MNIST's Debian location, then
``<data.download_dir>/<name>``). Only when none holds the files and ``data.download`` is true are
the official files fetched; otherwise the DatasetError lists every way to get them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pd_core.config import DataConfig
from pd_core.data.common import DatasetError
from pd_core.data.download import OFFICIAL_FILES, download_official
from pd_core.data.files import join_url

# Where Debian's dataset-fashion-mnist package puts the files.
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_PRETTY = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}


def _missing_message(cfg: DataConfig, root: str, wanted: str) -> str:
    pretty = _PRETTY.get(cfg.name, cfg.name)
    ways = []
    if cfg.name == "fashion_mnist" and cfg.url is None:
        ways.append("install it with `sudo apt-get install dataset-fashion-mnist` (files go to "
                    f"{FASHION_MNIST_DEFAULT_DIR})")
    ways.append(f"set data.url to a directory or fsspec URL that holds {wanted}")
    if cfg.name in OFFICIAL_FILES:
        ways.append(f"set data.download=true to fetch the official files (sha256-checked) into "
                    f"{_download_target(cfg)}")
    return f"{pretty} not found: {join_url(root, wanted)} does not exist; " + ", or ".join(ways)


def _download_target(cfg: DataConfig) -> str:
    return cfg.url if cfg.url is not None else join_url(cfg.download_dir, cfg.name)


def _roots(cfg: DataConfig) -> list[str]:
    """Where to look, in order: data.url, else the default location, then the download directory."""
    if cfg.url is not None:
        return [cfg.url]
    defaults = [FASHION_MNIST_DEFAULT_DIR] if cfg.name == "fashion_mnist" else []
    return [*defaults, join_url(cfg.download_dir, cfg.name)]


def _locate(cfg: DataConfig, names: Sequence[str],
            finder: Callable[[str, str], str | None]) -> tuple[str, list[str]]:
    """(root, urls) of the first root holding all ``names``; download when allowed; else DatasetError."""
    for root in _roots(cfg):
        found = [finder(root, n) for n in names]
        if all(found):
            return root, found  # type: ignore[return-value]
    if cfg.download:
        target = _download_target(cfg)
        download_official(cfg.name, target, mirror=cfg.mirror)
        found = [finder(target, n) for n in names]
        if all(found):
            return target, found  # type: ignore[return-value]
    root = _roots(cfg)[0]
    wanted = next(n for n in names if not finder(root, n))
    raise DatasetError(_missing_message(cfg, root, wanted if "." in wanted else f"{wanted}.gz"))


def _source_name(cfg: DataConfig) -> str:
    """The location named in messages: data.url, else the default directory or the dataset's name."""
    return cfg.url or (FASHION_MNIST_DEFAULT_DIR if cfg.name == "fashion_mnist" else cfg.name)
