"""Kernel Inception Distance (unbiased polynomial-kernel MMD^2) and k-NN precision/recall.

Both work on any features (Inception pool3, the project's classifier, ...): "Inception" in the name
is historical (Binkowski et al. 2018).
"""

from __future__ import annotations

import numpy as np
import torch

from pd_core.metrics.stats import ArrayLike


def _as_features(name: str, value: ArrayLike) -> torch.Tensor:
    """(N, D) float64 CPU tensor, checked finite."""
    t = value.detach() if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    t = t.to("cpu", torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D); got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN/inf)")
    return t


def polynomial_mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 between samples x (m, d) and y (m, d).

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2
    """
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3  # (m, m)
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    off_xx = k_xx.sum() - k_xx.diagonal().sum()
    off_yy = k_yy.sum() - k_yy.diagonal().sum()
    return float(off_xx / (m * (m - 1)) + off_yy / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(feats1: ArrayLike, feats2: ArrayLike, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over ``subsets`` random subsets of the unbiased polynomial MMD^2.

    Each subset draws m = min(subset_size, n1, n2) rows without replacement from each set (numpy
    ``default_rng(seed)``, so the same seed gives the same subsets). std uses ddof = 0, as
    torch-fidelity. Unbiased: the expected value is 0 for two samples of one distribution, so a
    small negative mean is normal.
    """
    x, y = _as_features("feats1", feats1), _as_features("feats2", feats2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feats1 and feats2 must have the same feature dim; got {x.shape[1]} and {y.shape[1]}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1; got {subsets}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set; got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, np.float64)
    for s in range(subsets):
        ix = torch.from_numpy(rng.choice(x.shape[0], m, replace=False))
        iy = torch.from_numpy(rng.choice(y.shape[0], m, replace=False))
        values[s] = polynomial_mmd2_unbiased(x[ix], y[iy])
    return float(values.mean()), float(values.std())


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (A, B) = |a|^2 + |b|^2 - 2 a.b, clipped at 0 (float64)."""
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d2.clamp_(min=0.0)


def knn_radii(feats: torch.Tensor, *, k: int, chunk: int = 1024) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest OTHER row (N,): the k-NN ball radii."""
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples; got {n}")
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk):
        d2 = _sq_dists(feats[start:start + chunk], feats)  # (chunk, N)
        # k + 1 smallest: the first is the point itself (distance 0).
        out[start:start + chunk] = d2.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, *, chunk: int) -> float:
    """Fraction of ``queries`` inside at least one ball (centres, radii): the manifold membership rate."""
    inside = 0
    for start in range(0, queries.shape[0], chunk):
        d2 = _sq_dists(queries[start:start + chunk], centres)  # (chunk, M)
        inside += int((d2 <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_feats: ArrayLike, fake_feats: ArrayLike, *, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    manifold(S) = union over s in S of the ball B(s, ||s - NN_k(s, S)||);
    precision = |{f in fake : f in manifold(real)}| / |fake|  (how many samples look real),
    recall    = |{r in real : r in manifold(fake)}| / |real|  (how much of the data is covered).
    """
    real, fake = _as_features("real_feats", real_feats), _as_features("fake_feats", fake_feats)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features must have the same dim; got {real.shape[1]} and {fake.shape[1]}")
    precision = _fraction_inside(fake, real, knn_radii(real, k=k, chunk=chunk), chunk=chunk)
    recall = _fraction_inside(real, fake, knn_radii(fake, k=k, chunk=chunk), chunk=chunk)
    return precision, recall
