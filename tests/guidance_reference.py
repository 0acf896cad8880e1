"""An analytic class-conditional teacher with a numpy twin, for the guidance tests: every guided quantity has an
independent float64 computation (the network output, the parameterization's formula, the guided combination)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests.reference import np_alpha_sigma

C, H, W = 2, 2, 2
K = 3  # classes; label K is the null class
PARAMETERIZATIONS = ("eps", "x", "v", "both")


class AnalyticNet(nn.Module):
    """out = 2.5 tanh(A z + sin(lambda / 5) c_y + w g): class-conditional (K + 1 rows, the last the null class),
    optionally taking a guidance weight w. 2C output channels for ``both``."""

    def __init__(self, seed: int, *, out_channels: int = C, takes_w: bool = False):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.a = rng.normal(size=(out_channels, C)) * 0.7
        self.c = rng.normal(size=(K + 1, out_channels))
        self.g = rng.normal(size=(out_channels,)) * 0.3
        self.takes_w = takes_w
        self.calls = 0

    def numpy(self, z: np.ndarray, lam: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        pre = np.einsum("oc,bchw->bohw", self.a, z) + (np.sin(lam / 5.0)[:, None] * self.c[y])[:, :, None, None]
        if self.takes_w:
            pre = pre + (w[:, None] * self.g[None])[:, :, None, None]
        return 2.5 * np.tanh(pre)

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, y: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        assert z.dtype == torch.float64 and y is not None and (w is not None) == self.takes_w
        self.calls += 1
        out = self.numpy(z.numpy(), logsnr.numpy(), y.numpy(), None if w is None else w.double().numpy())
        return torch.from_numpy(out)


def np_x_eps(out: np.ndarray, z: np.ndarray, lam: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The parameterizations of docs/design.md, written out independently."""
    a, s = (v[:, None, None, None] for v in np_alpha_sigma(lam))
    if kind == "eps":
        return (z - s * out) / a, out
    if kind == "x":
        x = out
    elif kind == "v":
        x = a * z - s * out
    else:
        x = s**2 * out[:, :C] + a * (z - s * out[:, C:])
    return x, (z - a * x) / s


def np_guided(net: AnalyticNet, z, lam, y, w, kind):
    """(x_w, eps_w combined on eps, eps_w from x_w) in float64 numpy."""
    null = np.full_like(y, K)
    x_c, e_c = np_x_eps(net.numpy(z, lam, y), z, lam, kind)
    x_u, e_u = np_x_eps(net.numpy(z, lam, null), z, lam, kind)
    wb = np.asarray(w, dtype=np.float64).reshape(-1, 1, 1, 1)
    x_w = (1 + wb) * x_c - wb * x_u
    a, s = (v[:, None, None, None] for v in np_alpha_sigma(lam))
    return x_w, (1 + wb) * e_c - wb * e_u, (z - a * x_w) / s


def _batch(seed: int, b: int = 6):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(b, C, H, W))
    lam = np.array([-20.0, -7.5, -1.0, 0.0, 3.0, 20.0])[:b]
    y = rng.integers(0, K, size=b)
    return z, lam, y


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))
