"""Checks of the ``pd`` command's own arguments, done before anything heavy is imported (no torch, no Prefect).

Every check raises :class:`BadArgument` (exit 2) with one line naming the option and the fix. Bounds:
``--num`` 1..MAX_NUM, ``--steps`` 1..MAX_STEPS, ``--batch-size`` 1..``--num``, ``--gamma`` in [0, 1],
``--seed`` 0..2**63-1, ``--guidance`` in [0, MAX_GUIDANCE] (also its argparse type, :func:`guidance_weight`),
``--label`` >= 0 (the model's classes are checked once it is loaded). URIs (``--model``, ``--out``,
``--storage``, ``--tracking-uri``) must name a protocol fsspec can open and carry no credentials; ``--out``
must end in ``.png`` and its folder exist.
"""

from __future__ import annotations

import argparse
import os
import re

from pd_core.config.secrets import credential_problem
from pd_core.config.urls import url_problem

MAX_NUM = 100_000  # images per `pd sample`
MAX_STEPS = 10_000  # sampling steps (the paper's largest teacher samples in 8192)
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 100.0  # guidance weight w (eval.guidance_weights has the same bound)
MAX_PROMPTS = 64  # --prompt rows of one `pd sample` grid
MAX_PROMPT_CHARS = 2000  # one prompt (a caption's bound in pd_core.data.captions)
MLFLOW_SCHEMES = ("models:/", "runs:/")
_MLFLOW_URI = re.compile(r"^(models:/[^/\s@]+([@/][^/\s]+)?|runs:/[^/\s]+/\S+)$")


class BadArgument(ValueError):
    """A command-line argument out of bounds or malformed: exit 2, one line."""


def restart_round(text: str) -> int:
    """``--restart-from``: a round number >= 0, or ``teacher`` (= 0)."""
    if text.strip().lower() == "teacher":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a round number (0 = the teacher) or 'teacher', got {text!r}") \
            from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = the teacher), got {value}")
    return value


def guidance_weight(text: str) -> float:
    """``--guidance``: a finite weight in [0, MAX_GUIDANCE] (argparse turns the error into a usage error, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= value <= MAX_GUIDANCE:
        raise argparse.ArgumentTypeError(f"must be a weight in [0, {MAX_GUIDANCE:g}], got {text}")
    return value


def check_bounds(name: str, value: int | float | None, *, low: float, high: float, hint: str = "") -> None:
    """BadArgument unless ``low <= value <= high`` (None means "not given": fine)."""
    if value is None:
        return
    if not low <= value <= high:
        more = f"; {hint}" if hint and value > high else ""
        raise BadArgument(f"{name} must be between {_num(low)} and {_num(high)}, got {_num(value)}{more}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_sampling(*, num: int | None, steps: int | None, batch_size: int | None, gamma: float | None,
                   seed: int | None, guidance: float | None = None, label: int | None = None) -> None:
    """The bounds of `pd sample` / `pd eval` (None: the option is not taken or not given)."""
    check_bounds("--num", num, low=1, high=MAX_NUM, hint="sample in several runs (other --seed) for more")
    check_bounds("--steps", steps, low=1, high=MAX_STEPS, hint="a distilled student samples in its own few steps")
    if batch_size is not None:
        check_bounds("--batch-size", batch_size, low=1, high=num if num is not None else MAX_NUM,
                     hint="at most --num images go in one batch" if num is not None else "")
    check_bounds("--gamma", gamma, low=0.0, high=1.0)
    check_bounds("--seed", seed, low=0, high=MAX_SEED)
    check_bounds("--guidance", guidance, low=0.0, high=MAX_GUIDANCE, hint="the usual guidance weights are 0 to 8")
    if label is not None and label < 0:
        raise BadArgument(f"--label must be a class >= 0, got {label}")


def check_prompts(prompts: list[str] | None, *, label: int | None, sampler: str) -> None:
    """The bounds of ``pd sample --prompt`` (text-to-image models): at most MAX_PROMPTS prompts of at most
    MAX_PROMPT_CHARS characters, DDIM only, no --label."""
    if not prompts:
        return
    if len(prompts) > MAX_PROMPTS:
        raise BadArgument(f"--prompt is given {len(prompts)} times, at most {MAX_PROMPTS} (one grid row each)")
    long = next((p for p in prompts if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise BadArgument(f"--prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(long)}")
    if label is not None:
        raise BadArgument("--label is for class-conditional models; a text-to-image model takes --prompt")
    if sampler != "ddim":
        raise BadArgument(f"--sampler {sampler}: text-to-image models sample with ddim (the exported pipeline's)")


def check_uri(name: str, value: str | None, *, storage: bool = True) -> None:
    """BadArgument when a URI option carries credentials (the value is never echoed) or, for a ``storage``
    location (not a tracking URI: sqlite://, postgresql://...), has a protocol fsspec cannot open."""
    if value is None:
        return
    if not value.strip():
        raise BadArgument(f"{name} must be a path or URL, got ''")
    if value.startswith(MLFLOW_SCHEMES) or not storage:
        if credential_problem(value) is not None:
            raise BadArgument(f"{name} must not contain credentials; pass them through environment variables")
        return
    problem = url_problem(value)
    if problem is not None:
        raise BadArgument(f"{name} {problem}")


def check_model(value: str) -> None:
    """``--model``: an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH) or a checkpoint
    folder whose manifest.json exists (a definite "not there" is refused; an unreachable store is left to loading)."""
    check_uri("--model", value)
    if value.startswith(MLFLOW_SCHEMES):
        if not _MLFLOW_URI.match(value):
            raise BadArgument(f"--model {value} is not an MLflow model URI such as models:/NAME@ALIAS, "
                              f"models:/NAME/VERSION or runs:/RUN_ID/sampler")
        return
    import fsspec  # light; only the protocol's own package is imported on top (s3fs for s3://)

    try:
        fs, path = fsspec.core.url_to_fs(value.rstrip("/"))
        found = fs.exists(f"{path}/manifest.json")
    except (FileNotFoundError, NotADirectoryError):
        found = False
    except Exception:  # noqa: BLE001 - unreachable or misconfigured store: loading says what is wrong
        return
    if not found:
        raise BadArgument(f"--model {value}: no checkpoint there (no manifest.json); pass a checkpoint folder as "
                          f"`pd run` prints it, or an MLflow URI such as models:/NAME@ALIAS")


def check_out(value: str) -> None:
    """``--out``: a .png path or URL without credentials whose (local) folder exists."""
    check_uri("--out", value)
    if not value.lower().endswith(".png"):
        raise BadArgument(f"--out {value} must end in .png (the grid is written as PNG)")
    if "://" not in value or value.startswith("file://"):
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(value.removeprefix("file://")))) or "."
        if not os.path.isdir(folder):
            raise BadArgument(f"--out {value}: folder {folder} does not exist; create it or write elsewhere")
