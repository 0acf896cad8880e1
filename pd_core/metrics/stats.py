"""Gaussian fits of features (streaming, saved as npz) and the Frechet distance between two fits."""

from __future__ import annotations

import io
from dataclasses import dataclass

import fsspec
import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def as_float64(name: str, value: ArrayLike, *, ndim: int) -> np.ndarray:
    """``value`` (numpy or torch, any device/dtype) as a float64 numpy array with ``ndim`` dims."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s); got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values (NaN/inf)")
    return arr


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit of N feature vectors: mean mu (D,), covariance sigma (D, D) with ddof = 1, count n."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def from_features(cls, feats: ArrayLike) -> FeatureStats:
        """One-shot fit: mu = mean(x), sigma = (x - mu)^T (x - mu) / (n - 1)  (as pytorch-fid's np.cov)."""
        x = as_float64("feats", feats, ndim=2)
        if x.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance; got {x.shape[0]}")
        return cls(mean=x.mean(axis=0), cov=np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), n=x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def to_bytes(self) -> bytes:
        """npz bytes with arrays mu, sigma, n (the names pytorch-fid's .npz files use for mu/sigma)."""
        buf = io.BytesIO()
        np.savez(buf, mu=self.mean, sigma=self.cov, n=np.int64(self.n))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureStats:
        # allow_pickle=False: a stats file must never be able to execute code.
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            n = int(z["n"]) if "n" in z.files else 0
            return cls(mean=np.asarray(z["mu"], np.float64), cov=np.asarray(z["sigma"], np.float64), n=n)

    def save(self, url: str, *, storage_options: dict | None = None) -> str:
        """Write the npz to a path or fsspec URL; return ``url``."""
        with fsspec.open(url, "wb", **(storage_options or {})) as f:
            f.write(self.to_bytes())
        return url

    @classmethod
    def load(cls, url: str, *, storage_options: dict | None = None) -> FeatureStats:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return cls.from_bytes(f.read())


class StreamingStats:
    """Accumulates a :class:`FeatureStats` batch by batch in float64 (Chan et al.'s pairwise merge).

    For a running (n_a, mu_a, M_a) and a batch (n_b, mu_b, M_b) with M the centred scatter
    sum (x - mu)(x - mu)^T:  n = n_a + n_b,  delta = mu_b - mu_a,
    mu = mu_a + delta n_b / n,  M = M_a + M_b + delta delta^T n_a n_b / n.
    Merging centred scatters avoids the cancellation of sum(x x^T) - n mu mu^T when |mu| >> std.
    """

    def __init__(self, dim: int | None = None):
        self.n = 0
        self._mean = np.zeros(dim or 0, np.float64)
        self._scatter = np.zeros((dim or 0, dim or 0), np.float64)

    def update(self, feats: ArrayLike) -> StreamingStats:
        x = as_float64("feats", feats, ndim=2)  # (B, D)
        if x.shape[0] == 0:
            return self
        if self.n == 0:
            self._mean = x.mean(axis=0)
            self._scatter = (x - self._mean).T @ (x - self._mean)  # (D, D)
            self.n = x.shape[0]
            return self
        if x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"feature dim changed: accumulated {self._mean.shape[0]}, batch has {x.shape[1]}")
        n_b = x.shape[0]
        mu_b = x.mean(axis=0)
        scatter_b = (x - mu_b).T @ (x - mu_b)
        n = self.n + n_b
        delta = mu_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * (self.n * n_b / n)
        self.n = n
        return self

    def finalize(self) -> FeatureStats:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance; got {self.n}")
        return FeatureStats(mean=self._mean.copy(), cov=self._scatter / (self.n - 1), n=self.n)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric PSD matrix: V diag(sqrt(max(w, 0))) V^T from eigh(a).

    Round-off makes covariance eigenvalues slightly negative (e.g. when D > N); they are clipped to 0.
    """
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2}), which equals tr(sqrtm(sigma1 sigma2)).

    sigma1^{1/2} sigma2 sigma1^{1/2} is symmetric PSD, so both square roots are symmetric eigen-
    decompositions: stable where scipy's sqrtm of the non-symmetric sigma1 sigma2 returns complex
    parts or needs an eps offset (pytorch-fid).
    """
    root1 = _sym_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2}).
    Accepts numpy arrays or torch tensors. Tiny negative results (round-off, identical inputs) are
    returned as 0.
    """
    m1, m2 = as_float64("mu1", mu1, ndim=1), as_float64("mu2", mu2, ndim=1)
    s1, s2 = as_float64("sigma1", sigma1, ndim=2), as_float64("sigma2", sigma2, ndim=2)
    d = m1.shape[0]
    for name, value in (("mu2", m2), ("sigma1", s1), ("sigma2", s2)):
        expected = (d,) if value.ndim == 1 else (d, d)
        if value.shape != expected:
            raise ValueError(f"{name} must have shape {expected} to match mu1 {m1.shape}; got {value.shape}")
    diff = m1 - m2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(value, 0.0)


def frechet_distance_stats(a: FeatureStats, b: FeatureStats) -> float:
    """:func:`frechet_distance` of two :class:`FeatureStats`."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
