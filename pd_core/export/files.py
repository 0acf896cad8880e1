"""What every export shares: its one-line error, a fresh local output path, the step-count check, and
permissions others can read (0755 folders, 0644 files, less what the user's umask removes)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pd_core.interop.diffusers_folder import check_timesteps
from pd_core.schedule import DiscreteSchedule, Schedule


class ExportError(ValueError):
    """An export that cannot be made; one line naming what and the fix."""


def new_output_path(out: str, *, what: str) -> Path:
    """A local path that does not exist yet (its parent is created); ExportError otherwise."""
    if "://" in out and not out.startswith("file://"):
        raise ExportError(f"--out {out}: {what} is written to a local path; copy it to remote storage afterwards")
    path = Path(out.removeprefix("file://")).expanduser()
    if path.exists():
        raise ExportError(f"--out {path} already exists; choose a new path (an export never overwrites anything)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ExportError(f"--out {path}: {path.parent} (or a folder above it) is a file, not a folder; choose a "
                          f"path in a folder") from None
    remove_stale_partials(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove ``.<name>.partial-<pid>`` files or folders next to ``target`` whose writing process is gone (a
    killed export); the removed paths."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.partial-(\d+)$")
    removed = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def check_steps(schedule: Schedule, *, steps: int, most: int) -> None:
    """ExportError unless 1 <= steps <= most and, on a discrete schedule, steps <= its T timesteps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
        raise ExportError(f"--steps must be an integer between 1 and {most}, got {steps!r}")
    if isinstance(schedule, DiscreteSchedule):
        check_timesteps(steps=steps, num_train_timesteps=schedule.num_timesteps, source="the model", field="--steps")


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask would set it for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(path: Path) -> None:
    """Make ``path`` (a file, or a folder and everything under it) 0755 for folders and 0644 for files, less the
    user's umask, as a plain ``mkdir`` and ``open`` would (a temporary folder is created 0700)."""
    mask = _umask()
    if path.is_dir():
        for root, dirs, names in os.walk(path):
            os.chmod(root, 0o755 & ~mask)
            for name in names:
                os.chmod(os.path.join(root, name), 0o644 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755 & ~mask)
    else:
        os.chmod(path, 0o644 & ~mask)
