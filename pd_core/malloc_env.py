"""glibc malloc settings for the processes the project starts (no torch: the CLI applies them before importing it).

glibc serves a request above ``M_MMAP_THRESHOLD`` with its own ``mmap`` and unmaps it on ``free``,
and returns the top of the heap to the kernel once more than ``M_TRIM_THRESHOLD`` is free. A
network's activations are megabytes each, allocated and freed on every call, so by default a
sampling or training loop maps and unmaps (and the kernel zero-fills) the same buffers over and
over. With

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824

buffers up to 32 MiB come from the heap and up to 1 GiB of freed heap is kept for reuse.
glibc reads ``GLIBC_TUNABLES`` once, when a process starts: setting it in a running process
changes nothing, so it goes into the environment of the processes we start, and ``pd`` re-executes
itself once with it (:func:`reexec_with_malloc_tunables`). A user's own glibc.malloc settings
win; ``PD_MALLOC_TUNABLES=0`` turns all of this off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

VARIABLE = "GLIBC_TUNABLES"
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
OPT_OUT = "PD_MALLOC_TUNABLES"  # "0": leave GLIBC_TUNABLES alone everywhere
_OURS = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def is_glibc() -> bool:
    """True when this Python runs on glibc (the only C library that reads GLIBC_TUNABLES)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def with_malloc_tunables(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` whose GLIBC_TUNABLES also holds the malloc settings above.

    Unchanged when ``env`` opts out (``PD_MALLOC_TUNABLES=0``) or already sets either malloc
    threshold itself (the user's value wins); other tunables already there are kept.
    """
    out = dict(env)
    current = out.get(VARIABLE, "")
    if out.get(OPT_OUT) == "0" or any(name in current for name in _OURS):
        return out
    out[VARIABLE] = f"{current}:{MALLOC_TUNABLES}" if current else MALLOC_TUNABLES
    return out


def needs_reexec(env: Mapping[str, str], *, glibc: bool) -> bool:
    """True when a process started with ``env`` on glibc would get the malloc settings only by re-executing."""
    return glibc and with_malloc_tunables(env) != dict(env)


def reexec_with_malloc_tunables(argv: Sequence[str] | None = None) -> None:
    """Replace this process by itself with the malloc settings in its environment, when they are missing.

    Returns (doing nothing) when they are set, opted out, or not glibc. ``argv`` is the command line
    to run (default: this interpreter with the options and arguments it was started with); the
    process keeps its id, so signals and pid files still reach it. Call it before anything
    that allocates much or starts threads.
    """
    if not needs_reexec(os.environ, glibc=is_glibc()):
        return
    args = list(argv) if argv is not None else [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(args[0], args, with_malloc_tunables(os.environ))  # noqa: S606 - this very program, re-executed
