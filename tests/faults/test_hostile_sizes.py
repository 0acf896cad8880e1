"""Size-like arguments and config fields are bounded by what they imply, before any work: one line, exit 2.

The bombs (a 20-digit batch size, 2^40 sampling steps, a 10^8-channel U-Net, a 100,000-image grid at scale 32)
run in a child process whose address space and CPU time are capped, so anything but a refusal up front dies there.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pd_core import images
from pd_core.config import ConfigError, load_config
from pd_core.config.limits import activation_bytes_at_least, parameters_at_least
from pd_core.unet import UNet, unet_spec
from tests.faults.helpers import _cfg, _copy_of

REPO = Path(__file__).resolve().parents[2]
CAP_BYTES = 4 << 30
CAP_CPU_S = 30


def _capped(argv: list[str], *, tmp_path: Path) -> subprocess.CompletedProcess:
    """``pd ARGV`` in a child capped at 4 GiB of address space and 30 s of CPU time."""
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({CAP_BYTES}, {CAP_BYTES}))
        resource.setrlimit(resource.RLIMIT_CPU, ({CAP_CPU_S}, {CAP_CPU_S}))
        from flows.cli import main
        sys.exit(main({argv!r}))
    """)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PD_HOME": str(tmp_path / "pd-home"),
           "OMP_NUM_THREADS": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env)


CONFIG_BOMBS = [
    ("distill.batch_size=99999999999999999999", "distill.batch_size must be <= 1048576, got 99999999999999999999"),
    ("distill.start_steps=1099511627776", "distill.start_steps must be at most 65536 (a power of two)"),
    ("model.ch=1e8", "model.ch must be <= 4096"),
    ("model.ch=4096", "model.ch implies at least 9,521,070,080 parameters"),
    ("distill.batch_size=1048576", "need at least"),
]


@pytest.mark.slow
@pytest.mark.parametrize("override, message", CONFIG_BOMBS, ids=[o for o, _ in CONFIG_BOMBS])
def test_a_size_bomb_in_the_config_is_refused_at_config_time_under_a_memory_cap(tmp_path, override, message):
    overrides = [override, "data.image_size=256", "model.ch_mult=[1,1]"] if "1048576" in override else [override]
    argv = ["run", "--preset", "smoke", "--name", "x", "--storage", str(tmp_path / "s"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    for item in overrides:
        argv += ["--set", item]
    proc = _capped(argv, tmp_path=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (proc.returncode, proc.stderr[-1500:])
    assert not (tmp_path / "s").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_a_huge_sample_grid_is_refused_from_the_arguments_before_sampling(template: Path, tmp_path: Path):
    _, student = _copy_of(template, tmp_path, _cfg("faults"))
    proc = _capped(["sample", "--model", student.uri, "--num", "100000", "--scale", "32",
                    "--out", str(tmp_path / "g.png")], tmp_path=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-1500:])
    assert lines[0].startswith("error: --num 100000 --scale 32: a display grid of ") and "exceeds 8192 px" in lines[0]
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("num, height, nrow, scale", [(1, 8, None, None), (7, 8, None, 3), (10, 28, 10, None),
                                                      (17, 32, 4, 2), (3, 5, 1, 1)])
def test_the_grid_size_from_the_arguments_is_the_grid_display_grid_draws(num, height, nrow, scale):
    x = torch.zeros(num, 1, height, height)
    grid_h, grid_w, _ = images.display_grid_size(num=num, height=height, width=height, nrow=nrow, scale=scale)
    assert images.display_grid(x, nrow=nrow, scale=scale).shape[:2] == (grid_h, grid_w)


@pytest.mark.parametrize("preset, overrides", [("smoke", []), ("fmnist-cpu", []), ("cifar10-paper", []),
                                               ("smoke", ["model.resblock_resample=false"])])
def test_the_config_size_bounds_are_lower_bounds_of_the_real_network(preset, overrides):
    cfg = load_config(preset=preset, overrides=overrides)
    spec = unet_spec(cfg, in_channels=3)
    shape = dict(ch=spec.ch, ch_mult=spec.ch_mult, num_res_blocks=spec.num_res_blocks, image_size=spec.image_size,
                 resblock_resample=spec.resblock_resample)
    with torch.device("meta"):
        real = sum(p.numel() for p in UNet(spec).parameters())
    bound = parameters_at_least(emb_ch=spec.emb_ch, **shape)
    assert 0.5 * real < bound <= real, (bound, real)
    if preset != "smoke":
        return
    net, saved = UNet(spec), [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size() if t.requires_grad or t.grad_fn is not None else 0
        return t

    z = torch.randn(2, 3, spec.image_size, spec.image_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(z, torch.zeros(2)).sum().backward()
    assert activation_bytes_at_least(batch=2, **shape) <= saved[0]


@pytest.mark.parametrize("override, message", [
    ("distill.updates_per_round=true", "distill.updates_per_round must be a number, got true"),
    ("model.ch_mult=[1,true]", "model.ch_mult must be a list of numbers, got [1, true]"),
    ("data.image_size=100000", "data.image_size must be <= 4096"),
])
def test_booleans_and_oversize_values_for_numbers_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(preset="smoke", overrides=[override])
    assert message in str(err.value)
