"""The names of the parameterizations and loss weightings, and the checks on them.

No torch here, so a config validates (``pd config``, ``pd run``'s first step) without importing it.
"""

from __future__ import annotations

from collections.abc import Iterable

PARAMETERIZATIONS = ("eps", "x", "v", "both")
WEIGHTINGS = ("constant", "snr", "snr_trunc", "snr_plus_one")


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
