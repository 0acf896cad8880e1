"""pd_core.malloc_env: the glibc malloc setting reaches every process the project starts, the user's own wins,
and `pd` re-executes itself once to get it (glibc reads GLIBC_TUNABLES only at process start)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pd_core.launch import child_env
from pd_core.malloc_env import MALLOC_TUNABLES, OPT_OUT, VARIABLE, is_glibc, needs_reexec, with_malloc_tunables

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (VARIABLE, OPT_OUT)}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_the_setting_is_added_kept_beside_other_tunables_and_never_overrides_the_users():
    assert with_malloc_tunables({})[VARIABLE] == MALLOC_TUNABLES
    assert MALLOC_TUNABLES == "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
    other = {VARIABLE: "glibc.pthread.rseq=0"}
    assert with_malloc_tunables(other)[VARIABLE] == f"glibc.pthread.rseq=0:{MALLOC_TUNABLES}"
    users = {VARIABLE: "glibc.malloc.trim_threshold=0"}
    assert with_malloc_tunables(users) == users
    assert with_malloc_tunables({OPT_OUT: "0"}) == {OPT_OUT: "0"}
    env = {"A": "1"}
    with_malloc_tunables(env)
    assert env == {"A": "1"}  # a copy: the caller's mapping is left alone


def test_reexec_is_needed_only_on_glibc_and_only_while_the_setting_is_missing():
    assert needs_reexec({}, glibc=True)
    assert not needs_reexec({}, glibc=False)
    assert not needs_reexec(with_malloc_tunables({}), glibc=True)
    assert not needs_reexec({OPT_OUT: "0"}, glibc=True)
    assert is_glibc() == os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


def test_torchrun_children_start_with_the_setting_and_this_checkout_on_the_path():
    env = child_env({"PYTHONPATH": "/elsewhere", "HOME": "/h"})
    assert env[VARIABLE] == MALLOC_TUNABLES and env["HOME"] == "/h" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    assert child_env({VARIABLE: "glibc.malloc.mmap_threshold=1"})[VARIABLE] == "glibc.malloc.mmap_threshold=1"


@pytest.mark.skipif(not is_glibc(), reason="GLIBC_TUNABLES is read by glibc only")
def test_a_process_reexecutes_itself_once_with_the_setting_keeping_its_pid():
    code = ("import os, sys; from pd_core.malloc_env import reexec_with_malloc_tunables; "
            "print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); "
            "reexec_with_malloc_tunables([sys.executable, *sys.orig_argv[1:]])")
    out = subprocess.run([sys.executable, "-c", code, "arg"], env=_env(), capture_output=True, text=True,
                         timeout=120, check=True).stdout.split("\n")
    first, second = out[0].split(), out[1].split()
    assert first[2] == "None" and second[2] == MALLOC_TUNABLES  # before and after the one re-exec
    assert first[1] == second[1]  # the same process
    assert len([line for line in out if line.startswith("start")]) == 2  # no loop


@pytest.mark.skipif(not is_glibc(), reason="GLIBC_TUNABLES is read by glibc only")
def test_the_pd_command_runs_with_the_setting_it_was_not_started_with(tmp_path):
    """`pd presets` started without GLIBC_TUNABLES: the interpreter that answers was started with it (a
    sitecustomize probe logs the environment of every interpreter start)."""
    probe = tmp_path / "sitecustomize.py"  # runs at every interpreter start in this test's environment
    probe.write_text("import os\n"
                     "if os.environ.get('PD_TEST_PROBE'):\n"
                     "    with open(os.environ['PD_TEST_PROBE'], 'a') as f:\n"
                     "        f.write(repr(os.environ.get('GLIBC_TUNABLES')) + '\\n')\n")
    log = tmp_path / "starts.txt"
    env = _env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", PD_TEST_PROBE=str(log), PD_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "presets"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "fmnist-cpu" in proc.stdout
    assert log.read_text().splitlines() == ["None", repr(MALLOC_TUNABLES)]
    log.unlink()
    opted_out = subprocess.run([sys.executable, "-m", "flows.cli", "presets"], env={**env, OPT_OUT: "0"},
                               capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert opted_out.returncode == 0 and log.read_text().splitlines() == ["None"]  # no re-exec when opted out
