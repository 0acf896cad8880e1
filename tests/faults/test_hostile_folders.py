"""Hostile diffusers teacher folders: every declared size is bounded before it costs memory or time.

The bombs run the real import (``read_diffusers_model``, what ``pd run --teacher-uri diffusers:F`` does) in a
child process whose address space and CPU time are capped: anything but a refusal before allocation dies of
MemoryError or SIGXCPU there instead of passing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pd_core import jobs
from pd_core.finite import NonFiniteOutputError
from pd_core.interop import bounds
from pd_core.interop.diffusers_folder import DiffusersImportError, preflight, read_configs
from pd_core.store import CheckpointStore
from tests.diffusers_models import diffusers, save_teacher
from tests.test_diffusers_import import teacher_cfg

REPO = Path(__file__).resolve().parents[2]
CAP_BYTES = 4 << 30  # torch + diffusers imported take ~1.5 GiB of address space; every bomb needs far more
CAP_CPU_S = 30


def _edit(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def _timesteps_bomb(folder: Path) -> None:
    _edit(folder / "scheduler" / "scheduler_config.json", num_train_timesteps=300_000_000)


def _layers_bomb(folder: Path) -> None:
    _edit(folder / "unet" / "config.json", layers_per_block=200_000)


def _blocks_bomb(folder: Path) -> None:
    n = 20_000
    _edit(folder / "unet" / "config.json", block_out_channels=[8] * n, down_block_types=["DownBlock2D"] * n,
          up_block_types=["UpBlock2D"] * n)


def _channels_bomb(folder: Path) -> None:
    _edit(folder / "unet" / "config.json", block_out_channels=[8192, 8192], norm_num_groups=4)


def _sparse_weights(folder: Path) -> None:
    with open(folder / "unet" / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.truncate(6 << 30)  # all zeros (a sparse file): the first 8 bytes declare an empty header


def _padded_weights(folder: Path) -> None:
    with open(folder / "unet" / "diffusion_pytorch_model.safetensors", "r+b") as f:
        f.truncate(6 << 30)  # a real header, then 6 GiB the header does not declare


BOMBS = {
    "timesteps-3e8": (_timesteps_bomb, "num_train_timesteps must be an integer in [2, 100000], got 300000000"),
    "layers-per-block-2e5": (_layers_bomb, "layers_per_block must be an integer in [1, 32], got 200000"),
    "20000-blocks": (_blocks_bomb, "block_out_channels must be a list of 1 to 8 channel counts"),
    "8192-channels": (_channels_bomb, "parameters, more than the 2,147,483,648 allowed"),
    "sparse-6GiB-weights": (_sparse_weights, "is not a safetensors file (its first 8 bytes declare a 0-byte header"),
    "padded-6GiB-weights": (_padded_weights, "is 6442450944 bytes but its header declares 193956"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BOMBS))
def test_a_size_bomb_in_a_teacher_folder_is_refused_before_allocation_under_a_memory_cap(tmp_path, case):
    plant, message = BOMBS[case]
    folder = save_teacher(tmp_path / "teacher")
    plant(folder)
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({CAP_BYTES}, {CAP_BYTES}))
        resource.setrlimit(resource.RLIMIT_CPU, ({CAP_CPU_S}, {CAP_CPU_S}))
        from pd_core.interop.diffusers import read_diffusers_model
        from pd_core.interop.diffusers_folder import DiffusersImportError
        try:
            read_diffusers_model({str(folder)!r})
        except DiffusersImportError as err:
            print(err)
            sys.exit(0)
        sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-1500:])
    line = proc.stdout.strip()
    assert message in line and "\n" not in line and str(folder) in line, line


def test_the_parameter_count_from_the_config_equals_diffusers_own_model_built_on_meta():
    configs = [
        dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, attention_head_dim=None,
             down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"]),
        dict(block_out_channels=[32, 64, 64, 96], layers_per_block=2, norm_num_groups=16, num_class_embeds=11,
             in_channels=3, out_channels=3, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                              "AttnDownBlock2D"],
             up_block_types=["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
        dict(block_out_channels=[16], layers_per_block=3, norm_num_groups=8, down_block_types=["AttnDownBlock2D"],
             up_block_types=["UpBlock2D"], add_attention=False),
    ]
    for config in configs:
        with torch.device("meta"):
            model = diffusers.UNet2DModel(sample_size=8, **config)
        assert bounds.unet_parameter_count(config) == sum(p.numel() for p in model.parameters()), config


def test_a_published_size_model_is_within_the_parameter_bound():
    # diffusers' default UNet2DModel (google/ddpm-style, 4 levels up to 896 channels) must import.
    config = dict(sample_size=256, block_out_channels=[224, 448, 672, 896], layers_per_block=2,
                  down_block_types=["DownBlock2D"] + ["AttnDownBlock2D"] * 3,
                  up_block_types=["AttnUpBlock2D"] * 3 + ["UpBlock2D"])
    bounds.check_unet_config(config, source="cfg")
    assert 1e8 < bounds.unet_parameter_count(config) < bounds.MAX_PARAMETERS


@pytest.mark.parametrize("changes, message", [
    (dict(sample_size=True), "sample_size must be an integer in [1, 4096], got True"),
    (dict(block_out_channels=[-8, 16]), "every block_out_channels entry must be an integer in [1, 8192], got -8"),
    (dict(block_out_channels=["8", 16]), "got '8'"),
    (dict(in_channels="1"), "in_channels must be an integer in [1, 64], got '1'"),
    (dict(layers_per_block=0), "layers_per_block must be an integer in [1, 32], got 0"),
    (dict(norm_num_groups=3), "must be a multiple of norm_num_groups 3"),
])
def test_bad_unet_sizes_are_refused_in_one_line_naming_the_field(tmp_path, changes, message):
    folder = save_teacher(tmp_path / "teacher")
    _edit(folder / "unet" / "config.json", **changes)
    with pytest.raises(DiffusersImportError) as err:
        read_configs(str(folder))
    assert message in str(err.value) and "unet/config.json" in str(err.value) and "\n" not in str(err.value)


def test_trained_betas_must_hold_exactly_num_train_timesteps_values(tmp_path):
    folder = save_teacher(tmp_path / "teacher")
    sched = folder / "scheduler" / "scheduler_config.json"
    _edit(sched, trained_betas=[0.01] * 16)
    with pytest.raises(DiffusersImportError, match="trained_betas must hold exactly num_train_timesteps = 1000 "
                                                   "values, got 16"):
        read_configs(str(folder))
    _edit(sched, trained_betas=[0.01] * 999 + [float("nan")])
    with pytest.raises(DiffusersImportError, match=r"finite number in \(0, 1\), got nan"):
        read_configs(str(folder))
    _edit(sched, trained_betas=[0.0001 + 0.00002 * k for k in range(1000)])
    assert read_configs(str(folder)).num_train_timesteps == 1000


def test_a_deeply_nested_config_is_refused_naming_the_file(tmp_path):
    folder = save_teacher(tmp_path / "teacher")
    (folder / "unet" / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DiffusersImportError) as err:
        read_configs(str(folder))
    assert str(err.value) == f"{folder}/unet/config.json nests more than 32 levels deep (a diffusers config has 2); " \
                             f"is it the right file?"
    assert bounds.parse_json(b'{"a": "[[[[{{{{\\"", "b": [[1]]}', source="x") == {"a": '[[[[{{{{"', "b": [[1]]}


def test_a_safetensors_header_that_does_not_fill_the_file_is_refused_before_reading_it(tmp_path):
    folder = save_teacher(tmp_path / "teacher")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data + b"\0" * 100)
    with pytest.raises(DiffusersImportError, match="header declares"):
        jobs.import_diffusers_teacher(teacher_cfg(folder, tmp_path / "s"), CheckpointStore(str(tmp_path / "s")),
                                      uri=f"diffusers:{folder}")
    weights.write_bytes(data)
    header = bounds.weights_header(read_configs(str(folder)).folder.fs, str(weights), source=str(weights))
    assert header["conv_in.weight"] == ("F32", (8, 1, 3, 3))
    assert sum(math.prod(shape) * 4 for _, shape in header.values()) + 8 < len(data)


def test_a_teacher_with_nan_weights_is_not_imported(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_teacher(tmp_path / "teacher")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(weights))
    cfg = teacher_cfg(folder, tmp_path / "store")
    store = CheckpointStore(cfg.storage.root)
    with pytest.raises(NonFiniteOutputError) as err:
        jobs.ensure_teacher(cfg, store)
    assert "1 of its weights are NaN or infinite; nothing was imported" in str(err.value)
    assert not store.is_complete(jobs.teacher_key(cfg.pipeline.name))
    assert preflight(cfg).num_train_timesteps == 1000  # the configs themselves are fine
