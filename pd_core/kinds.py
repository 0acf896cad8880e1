"""The names of the parameterizations and loss weightings, and the checks on them.

No torch here, so a config validates (``pd config``, ``pd run``'s first step) without importing it.
"""

from __future__ import annotations

from collections.abc import Iterable

PARAMETERIZATIONS = ("eps", "x", "v", "both")
WEIGHTINGS = ("constant", "snr", "snr_trunc", "snr_plus_one")
STUDENT_PARAMETERIZATIONS = ("auto", *PARAMETERIZATIONS)
# What "auto" gives the students of an eps teacher: eps students break down at one or two steps (paper
# section 4); benchmarks/your_model/RESULTS.md measures eps vs x vs v students of an eps teacher.
EPS_TEACHER_STUDENT = "v"


def check_kind(name: str, value: str, allowed: Iterable[str]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_combination(*, parameterization: str, weighting: str) -> None:
    """Refuse combinations the paper reports as diverging (Table 1: eps + truncated SNR)."""
    check_kind("parameterization", parameterization, PARAMETERIZATIONS)
    check_kind("weighting", weighting, WEIGHTINGS)
    if parameterization == "eps" and weighting == "snr_trunc":
        raise ValueError("parameterization 'eps' with weighting 'snr_trunc' diverges (paper Table 1); "
                         "use parameterization 'x', 'v' or 'both' with 'snr_trunc', or 'eps' with 'snr'")


def student_parameterization(*, requested: str, teacher: str) -> str:
    """The parameterization a student of a ``teacher``-parameterized network uses.

    ``requested`` is ``distill.student_parameterization``: a parameterization, or ``auto`` = the
    teacher's, except :data:`EPS_TEACHER_STUDENT` for an eps teacher. ``both`` has 2C output channels
    and the student starts as a copy of its teacher, so a switch to or from ``both`` is refused.
    """
    check_kind("distill.student_parameterization", requested, STUDENT_PARAMETERIZATIONS)
    check_kind("teacher parameterization", teacher, PARAMETERIZATIONS)
    if requested == "auto":
        return EPS_TEACHER_STUDENT if teacher == "eps" else teacher
    if (requested == "both") != (teacher == "both"):
        raise ValueError(f"distill.student_parameterization {requested!r} cannot start from a {teacher!r} teacher: "
                         "'both' needs twice the output channels of the others and a student is a copy of its "
                         "teacher; use eps, x or v (or both with a both teacher)")
    return requested
