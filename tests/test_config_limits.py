"""Config parsing is bounded: document size and alias expansion (a "billion laughs" fails fast, memory flat)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pd_core.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def billion_laughs(levels: int = 9, refs: int = 9) -> str:
    """``levels`` levels of ``refs`` aliases each under storage.storage_options: refs**levels strings once expanded."""
    lines = ["storage:", "  storage_options:",
             "    lol1: &lol1 [" + ", ".join(['"lol"'] * refs) + "]"]
    for i in range(2, levels + 1):
        lines.append(f"    lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * refs) + "]")
    return "\n".join(lines) + "\n"


def test_the_bomb_is_the_small_document_of_the_issue() -> None:
    text = billion_laughs()
    assert 600 < len(text.encode()) < 800 and text.count("*lol") == 8 * 9


def test_a_billion_laughs_config_fails_fast_in_one_line_with_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    # What `pd config` does (load, then print the resolved YAML), in a child process whose address space is
    # capped at 1 GiB: expanding the 387M strings needs gigabytes, so anything but a refusal before expansion
    # dies of MemoryError (or takes minutes).
    code = textwrap.dedent(f"""
        import resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from pd_core.config import ConfigError, load_config, to_yaml
        t0 = time.process_time()
        try:
            to_yaml(load_config(preset="smoke", path={str(path)!r}))
        except ConfigError as err:
            peak_kb = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
            print(f"{{time.process_time() - t0:.3f}} {{peak_kb}} {{err}}")
            sys.exit(0)
        sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, peak_rss_kb, message = proc.stdout.strip().split(" ", 2)
    assert float(seconds) < 1.0  # CPU seconds of the check (an expansion would take minutes), not wall time
    assert int(peak_rss_kb) < 200_000, peak_rss_kb  # what importing pydantic/yaml/fsspec takes, nothing more
    assert message == (f"config file {path}: it expands to more than 100000 YAML nodes through aliases "
                       f"(an alias bomb?); refusing it")


def test_an_alias_bomb_in_an_override_value_is_refused_too() -> None:
    value = "{a: &a [x, x, x, x, x, x, x, x, x], b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], " + \
            ", ".join(f"c{i}: &c{i} [" + ", ".join([f"*{'b' if i == 0 else f'c{i - 1}'}"] * 9) + "]"
                      for i in range(7)) + "}"
    t0 = time.process_time()  # CPU time: a neighbour's load does not count against the check
    with pytest.raises(ConfigError, match="the value of override storage.storage_options: it expands to more than"):
        load_config(preset="smoke", overrides=[f"storage.storage_options={value}"])
    assert time.process_time() - t0 < 1.0


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(ConfigError, match="recursive alias"):
        load_config(preset="smoke", overrides=["storage.storage_options=&a {x: *a}"])


def test_ordinary_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("teacher: {lr: &lr 0.0002}\ndistill: {lr: *lr, batch_size: 32}\n"
                    "eval:\n  <<: {num_samples: 64, kid_subset_size: 32}\n  seed: 1\n")
    cfg = load_config(preset="smoke", path=str(path))
    assert (cfg.teacher.lr, cfg.distill.lr, cfg.distill.batch_size, cfg.eval.num_samples, cfg.eval.seed) == \
        (0.0002, 0.0002, 32, 64, 1)


def test_an_oversize_config_document_is_refused(tmp_path: Path) -> None:
    from pd_core.config.loading import MAX_DOCUMENT_BYTES

    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * MAX_DOCUMENT_BYTES + "\n")
    with pytest.raises(ConfigError, match=r"is larger than the 1048576 bytes \(1 MiB\) a config may have"):
        load_config(preset="smoke", path=str(path))
    with pytest.raises(ConfigError, match=r"has 1048577 bytes, more than the 1048576 bytes"):
        load_config(preset="smoke", overrides=["eval.seed=" + "1" * (MAX_DOCUMENT_BYTES + 1)])
