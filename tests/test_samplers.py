"""Samplers with oracle denoisers whose outputs are known in closed form (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pd_core import samplers

LMIN, LMAX = -20.0, 20.0


from tests.reference import np_alpha_sigma, np_logsnr  # noqa: E402


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


class Recorder:
    """Wrap a denoiser; record every (z, logsnr) it is called with."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, z, lam):
        assert lam.shape == (z.shape[0],), "samplers must pass logsnr of shape (B,)"
        self.calls.append((z.clone(), lam.clone()))
        return self.fn(z, lam)


def point_oracle(x0: torch.Tensor):
    """Data set = the single point x0: x_hat = x0 always, eps_hat = (z - alpha x0) / sigma."""
    def fn(z, lam):
        a = _col(torch.sigmoid(lam).sqrt())
        s = _col(torch.sigmoid(-lam).sqrt())
        x_hat = x0.expand_as(z).clone()
        return x_hat, (z - a * x_hat) / s
    return fn


def gaussian_oracle(s2: float):
    """Data N(0, s^2 I): E[x | z] = alpha s^2 / (alpha^2 s^2 + sigma^2) z exactly."""
    def fn(z, lam):
        a2 = _col(torch.sigmoid(lam))
        sg2 = _col(torch.sigmoid(-lam))
        x_hat = a2.sqrt() * s2 / (a2 * s2 + sg2) * z
        return x_hat, (z - a2.sqrt() * x_hat) / sg2.sqrt()
    return fn


def np_gaussian_ddim_gain(s2: float, n: int) -> float:
    """DDIM with the Gaussian oracle is linear, x = c z_1; c by an independent scalar recursion."""
    c = 1.0  # z = c z_1
    for i in range(n - 1, -1, -1):
        a_t, s_t = np_alpha_sigma(np_logsnr((i + 1) / n))
        k = a_t * s2 / (a_t**2 * s2 + s_t**2)  # x_hat = k z
        if i == 0:
            return k * c
        a_s, s_s = np_alpha_sigma(np_logsnr(i / n))
        c = (a_s * k + s_s * (1 - a_t * k) / s_t) * c
    raise AssertionError


def np_gaussian_ode_gain(s2: float, n: int) -> float:
    """Exact probability-flow ODE from t = 1 to t = 1/N, then x_hat: y = z/alpha, eta = sigma/alpha,
    y(eta) = y_1 sqrt((s^2 + eta^2) / (s^2 + eta_1^2)), x_hat = s^2 / (s^2 + eta^2) y."""
    a1, s1 = np_alpha_sigma(np_logsnr(1.0))
    a, s = np_alpha_sigma(np_logsnr(1.0 / n))
    eta1, eta = s1 / a1, s / a
    return float(s2 / np.sqrt((s2 + eta**2) * (s2 + eta1**2)) / a1)


def _z(shape=(4, 2, 3, 3), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- DDIM -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 8, 64])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_point_oracle_returns_the_point(n, clip):
    x0 = torch.tensor(np.random.default_rng(1).uniform(-1, 1, size=(1, 2, 3, 3)))
    out = samplers.ddim(point_oracle(x0), _z(), num_steps=n, clip=clip)
    assert out.shape == (4, 2, 3, 3) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), x0.expand(4, -1, -1, -1).numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 8])
def test_ddim_walks_the_student_grid(n):
    rec = Recorder(point_oracle(torch.zeros(1, 2, 3, 3, dtype=torch.float64)))
    samplers.ddim(rec, _z(), num_steps=n)
    assert len(rec.calls) == n
    expected = np_logsnr([(i + 1) / n for i in range(n - 1, -1, -1)])
    got = np.array([lam[0].item() for _, lam in rec.calls])
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert got[0] == pytest.approx(-20.0, abs=1e-9)  # starts at t = 1
    # the first call sees the input noise unchanged
    assert torch.equal(rec.calls[0][0], _z())


def test_ddim_one_step_calls_once_and_returns_clipped_x_hat():
    def den(z, lam):
        x_hat = 3.0 * z + 0.5
        return x_hat, torch.zeros_like(z)
    rec = Recorder(den)
    z = _z(seed=3)
    out = samplers.ddim(rec, z, num_steps=1)
    assert len(rec.calls) == 1
    np.testing.assert_allclose(out.numpy(), np.clip(3.0 * z.numpy() + 0.5, -1, 1), atol=0)
    assert (out.abs() == 1).any()  # clipping really happened
    out_nc = samplers.ddim(den, z, num_steps=1, clip=False)
    np.testing.assert_allclose(out_nc.numpy(), 3.0 * z.numpy() + 0.5, atol=0)


def test_ddim_clips_x_and_recomputes_eps_before_stepping():
    """With clipping, the step uses clip(x_hat) and eps = (z - alpha_t clip(x_hat)) / sigma_t, NOT the
    denoiser's eps_hat: check the z handed to the second call against that, computed in numpy."""
    def den(z, lam):
        return torch.full_like(z, 2.0) + 0.1 * z, torch.full_like(z, 7.0)  # x out of range, eps inconsistent
    rec = Recorder(den)
    z = _z(seed=4)
    samplers.ddim(rec, z, num_steps=2)
    a_t, s_t = np_alpha_sigma(np_logsnr(1.0))
    a_s, s_s = np_alpha_sigma(np_logsnr(0.5))
    x_c = np.clip(2.0 + 0.1 * z.numpy(), -1, 1)
    z_s = a_s * x_c + s_s * (z.numpy() - a_t * x_c) / s_t
    np.testing.assert_allclose(rec.calls[1][0].numpy(), z_s, atol=1e-12)
    # without clipping the denoiser's own (x_hat, eps_hat) define the step
    rec2 = Recorder(den)
    samplers.ddim(rec2, z, num_steps=2, clip=False)
    np.testing.assert_allclose(rec2.calls[1][0].numpy(), a_s * (2.0 + 0.1 * z.numpy()) + s_s * 7.0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 16, 256])
def test_ddim_gaussian_oracle_is_the_linear_map_computed_independently(n):
    s2 = 0.25
    z = _z(seed=5)
    out = samplers.ddim(gaussian_oracle(s2), z, num_steps=n, clip=False)
    c = np_gaussian_ddim_gain(s2, n)
    np.testing.assert_allclose(out.numpy(), c * z.numpy(), rtol=1e-10, atol=1e-14)


def test_ddim_gaussian_oracle_many_steps_has_the_data_variance():
    s2 = 0.25
    n = 512
    c = np_gaussian_ddim_gain(s2, n)
    assert c**2 == pytest.approx(s2, rel=0.01)
    assert np_gaussian_ode_gain(s2, n) ** 2 == pytest.approx(s2, rel=0.01)
    z = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = samplers.ddim(gaussian_oracle(s2), z, num_steps=n, clip=False)
    assert out.var().item() == pytest.approx(s2, rel=0.05)
    assert abs(out.mean().item()) < 0.02
    # one step collapses to the mean: x_hat(z_1) ~ alpha_1 s^2 z
    one = samplers.ddim(gaussian_oracle(s2), z, num_steps=1, clip=False)
    assert one.var().item() < 1e-6


def test_ddim_callback_and_float32():
    seen = []
    z = _z().float()
    out = samplers.ddim(point_oracle(torch.zeros(1, 2, 3, 3)), z, num_steps=4,
                        callback=lambda k, n: seen.append((k, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert out.dtype == torch.float32


# ---- ancestral ------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_ancestral_deterministic_under_seed(gamma):
    den = gaussian_oracle(0.3)
    z = _z(seed=6)
    a = samplers.ancestral(den, z, num_steps=8, gamma=gamma, generator=torch.Generator().manual_seed(11))
    b = samplers.ancestral(den, z, num_steps=8, gamma=gamma, generator=torch.Generator().manual_seed(11))
    c = samplers.ancestral(den, z, num_steps=8, gamma=gamma, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.allclose(c, a)
    assert torch.isfinite(a).all()


def test_ancestral_does_not_touch_global_rng_when_given_a_generator():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    samplers.ancestral(gaussian_oracle(0.3), _z(), num_steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("n", [1, 2, 8])
def test_ancestral_calls_and_point_oracle(n):
    x0 = torch.tensor(np.random.default_rng(2).uniform(-1, 1, size=(1, 2, 3, 3)))
    rec = Recorder(point_oracle(x0))
    out = samplers.ancestral(rec, _z(), num_steps=n, generator=torch.Generator().manual_seed(0))
    assert len(rec.calls) == n
    np.testing.assert_allclose(out.numpy(), x0.expand(4, -1, -1, -1).numpy(), atol=1e-12)


def np_posterior(z_t, x, lam_t, lam_s):
    """q(z_s | z_t, x) for s < t.

    From alpha_{t|s} = alpha_t/alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2:
    mean = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x,
    var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2."""
    a_t, s_t = np_alpha_sigma(lam_t)
    a_s, s_s = np_alpha_sigma(lam_s)
    a_ts = a_t / a_s
    s2_ts = s_t**2 - a_ts**2 * s_s**2
    mean = (a_ts * s_s**2 / s_t**2)[:, None, None, None] * z_t + (a_s * s2_ts / s_t**2)[:, None, None, None] * x
    return mean, s2_ts * s_s**2 / s_t**2, s2_ts


def test_ancestral_moments_gamma0_is_the_gaussian_posterior():
    rng = np.random.default_rng(0)
    lam_t = np.array([-20.0, -5.0, 0.0, 3.0, 10.0])
    lam_s = lam_t + np.array([0.5, 2.0, 1.0, 4.0, 0.01])
    z_t, x = rng.normal(size=(5, 2, 2, 2)), rng.uniform(-1, 1, size=(5, 2, 2, 2))
    mean, logvar = samplers.ancestral_moments(z_t=torch.tensor(z_t), x_hat=torch.tensor(x),
                                              logsnr_t=torch.tensor(lam_t), logsnr_s=torch.tensor(lam_s), gamma=0.0)
    mean_np, var_np, var_ts = np_posterior(z_t, x, lam_t, lam_s)
    np.testing.assert_allclose(mean.numpy(), mean_np, rtol=1e-9, atol=1e-12)
    var = torch.exp(logvar).numpy().reshape(5, -1)[:, 0]
    np.testing.assert_allclose(var, var_np, rtol=1e-9)
    # and the design's form (1 - r) sigma_s^2, r = e^{lambda_t - lambda_s}
    r = np.exp(lam_t - lam_s)
    np.testing.assert_allclose(var, (1 - r) * np_alpha_sigma(lam_s)[1] ** 2, rtol=1e-9)
    # gamma = 1: sigma_{t|s}^2 = (1 - r) sigma_t^2; gamma in between: log-interpolation
    _, lv1 = samplers.ancestral_moments(z_t=torch.tensor(z_t), x_hat=torch.tensor(x), logsnr_t=torch.tensor(lam_t),
                                        logsnr_s=torch.tensor(lam_s), gamma=1.0)
    np.testing.assert_allclose(torch.exp(lv1).numpy().reshape(5, -1)[:, 0], var_ts, rtol=1e-9)
    m3, lv3 = samplers.ancestral_moments(z_t=torch.tensor(z_t), x_hat=torch.tensor(x), logsnr_t=torch.tensor(lam_t),
                                         logsnr_s=torch.tensor(lam_s), gamma=0.3)
    np.testing.assert_allclose(lv3.numpy().reshape(5, -1)[:, 0], 0.3 * np.log(var_ts) + 0.7 * np.log(var_np), rtol=1e-9)
    np.testing.assert_allclose(m3.numpy(), mean_np, rtol=1e-9, atol=1e-12)  # gamma changes only the variance


def test_ancestral_gaussian_oracle_many_steps_has_the_data_variance():
    s2 = 0.25
    z = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = samplers.ancestral(gaussian_oracle(s2), z, num_steps=256, gamma=0.0, clip=False,
                             generator=torch.Generator().manual_seed(2))
    assert out.var().item() == pytest.approx(s2, rel=0.05)


def test_ancestral_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        samplers.ancestral(gaussian_oracle(0.3), _z(), num_steps=2, gamma=1.5)


# ---- Heun (probability-flow ODE) ------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 8])
def test_heun_calls_2n_minus_1_and_point_oracle(n):
    x0 = torch.tensor(np.random.default_rng(3).uniform(-1, 1, size=(1, 2, 3, 3)))
    rec = Recorder(point_oracle(x0))
    out = samplers.heun(rec, _z(), num_steps=n)
    assert len(rec.calls) == 2 * n - 1
    np.testing.assert_allclose(out.numpy(), x0.expand(4, -1, -1, -1).numpy(), atol=1e-12)


def test_heun_deterministic():
    z = _z(seed=8)
    a = samplers.heun(gaussian_oracle(0.3), z, num_steps=6)
    b = samplers.heun(gaussian_oracle(0.3), z.clone(), num_steps=6)
    assert torch.equal(a, b)


def test_heun_is_second_order_on_gaussian_ode():
    """Against the exact ODE solution for Gaussian data, Heun beats DDIM (Euler) by a clear factor at every
    N, and its error shrinks faster than DDIM's when N doubles (second vs first order)."""
    s2 = 0.25
    z = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    errs_h, errs_d = [], []
    for n in (2, 4, 8, 16, 32, 64, 128):
        exact = np_gaussian_ode_gain(s2, n)
        h = samplers.heun(gaussian_oracle(s2), z, num_steps=n, clip=False).item()
        d = samplers.ddim(gaussian_oracle(s2), z, num_steps=n, clip=False).item()
        assert d == pytest.approx(np_gaussian_ddim_gain(s2, n), rel=1e-10)
        errs_h.append(abs(h - exact))
        errs_d.append(abs(d - exact))
    assert all(eh < ed / 3 for eh, ed in zip(errs_h, errs_d, strict=True)), (errs_h, errs_d)
    assert errs_h[-1] / errs_h[-2] < 0.4 < errs_d[-1] / errs_d[-2], (errs_h, errs_d)


# ---- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", [samplers.ddim, samplers.ancestral, samplers.heun])
def test_bad_arguments(sampler):
    den = gaussian_oracle(0.3)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_steps"):
            sampler(den, _z(), num_steps=bad)
    with pytest.raises(ValueError, match=r"\bz\b"):
        sampler(den, torch.zeros(4), num_steps=2)
    with pytest.raises(ValueError, match=r"\bz\b"):
        sampler(den, np.zeros((4, 1, 1, 1)), num_steps=2)


# ---- the stochastic sampler of Meng et al. (a 2/N DDIM step, then a forward-process step back) ----

def affine_gaussian_oracle(mu: float, s2: float):
    """Data N(mu, s^2 I): E[x | z] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha mu) exactly."""
    def fn(z, lam):
        a2, sg2 = _col(torch.sigmoid(lam)), _col(torch.sigmoid(-lam))
        x_hat = mu + a2.sqrt() * s2 / (a2 * s2 + sg2) * (z - a2.sqrt() * mu)
        return x_hat, (z - a2.sqrt() * x_hat) / sg2.sqrt()
    return fn


def np_stochastic_moments(mu: float, s2: float, n: int) -> tuple[float, float]:
    """Mean and variance of the sampler's output, per pixel, by an independent scalar recursion (float64).

    x_hat = k z + b is affine; the DDIM step to u is affine in z; the forward step adds independent noise.
    """
    m, v = 0.0, 1.0  # z ~ N(0, 1) at t = 1
    for i in range(n - 1, -1, -1):
        a_t, s_t = np_alpha_sigma(np_logsnr((i + 1) / n))
        k = a_t * s2 / (a_t**2 * s2 + s_t**2)
        b = mu - k * a_t * mu
        if i == 0:
            return k * m + b, k**2 * v
        a_u, s_u = np_alpha_sigma(np_logsnr((i - 1) / n))
        a_s, s_s = np_alpha_sigma(np_logsnr(i / n))
        c1, c2 = s_u / s_t, a_u - s_u * a_t / s_t  # z_u = c1 z + c2 x_hat
        m, v = (c1 + c2 * k) * m + c2 * b, (c1 + c2 * k) ** 2 * v
        r = a_s / a_u
        m, v = r * m, r**2 * v + (s_s**2 - r**2 * s_u**2)
    raise AssertionError


@pytest.mark.parametrize("n", [2, 4, 8])
def test_stochastic_two_step_moments_match_a_float64_recursion(n):
    mu, s2 = 0.3, 0.2
    z = torch.randn(40000, 1, 2, 2, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    out = samplers.stochastic_two_step(affine_gaussian_oracle(mu, s2), z, num_steps=n, clip=False,
                                       generator=torch.Generator().manual_seed(100 + n)).numpy().ravel()
    mean, var = np_stochastic_moments(mu, s2, n)
    count = out.size
    assert abs(out.mean() - mean) < 5 * np.sqrt(var / count), (out.mean(), mean)
    assert abs(out.var() - var) < 5 * var * np.sqrt(2 / count), (out.var(), var)
    if n > 2:  # and not DDIM's moments: the noise really is injected (at N = 2 both variances lie within 1 %)
        det = samplers.ddim(affine_gaussian_oracle(mu, s2), z, num_steps=n, clip=False).numpy().ravel()
        assert abs(det.var() - var) > 10 * var * np.sqrt(2 / count)


def test_stochastic_two_step_with_given_noise_matches_a_float64_reference():
    """The exact path: the same noise draws replayed, every step written out in numpy (with clipping)."""
    def den(z, lam):
        x_hat = 1.8 * torch.tanh(0.9 * z + torch.sin(_col(lam) / 4))  # leaves [-1, 1]: clipping shows
        return x_hat, torch.cos(z) + 0.2 * z  # inconsistent eps: the sampler must recompute it after clipping

    n, z = 6, _z(seed=8)
    out = samplers.stochastic_two_step(den, z, num_steps=n, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    zz = z.numpy()
    for i in range(n - 1, -1, -1):
        lam_t = np_logsnr((i + 1) / n)
        a_t, s_t = np_alpha_sigma(lam_t)
        x = np.clip(1.8 * np.tanh(0.9 * zz + np.sin(lam_t / 4)), -1, 1)
        if i == 0:
            zz = x
            break
        e = (zz - a_t * x) / s_t
        a_u, s_u = np_alpha_sigma(np_logsnr((i - 1) / n))
        a_s, s_s = np_alpha_sigma(np_logsnr(i / n))
        z_u = a_u * x + s_u * e
        noise = torch.randn(z.shape, dtype=torch.float64, generator=g).numpy()
        zz = (a_s / a_u) * z_u + np.sqrt(s_s**2 - (a_s / a_u) ** 2 * s_u**2) * noise
    np.testing.assert_allclose(out.numpy(), zz, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_stochastic_two_step_makes_n_calls_on_the_student_grid(n):
    rec = Recorder(point_oracle(torch.zeros(1, 2, 3, 3, dtype=torch.float64)))
    out = samplers.stochastic_two_step(rec, _z(), num_steps=n, generator=torch.Generator().manual_seed(0))
    assert len(rec.calls) == n
    got = np.array([lam[0].item() for _, lam in rec.calls])
    np.testing.assert_allclose(got, np_logsnr([(i + 1) / n for i in range(n - 1, -1, -1)]), atol=1e-9)
    assert float(out.abs().max()) == 0.0  # a point data set comes back exactly, noise or not
    if n == 1:
        torch.testing.assert_close(out, samplers.ddim(rec, _z(), num_steps=1))


def test_forward_step_has_the_forward_process_mean_and_variance():
    lam_u = torch.tensor([20.0, 3.0, 0.0, -5.0], dtype=torch.float64)
    lam_s = torch.tensor([19.0, 1.0, -0.5, -20.0], dtype=torch.float64)
    a_u, s_u = np_alpha_sigma(lam_u.numpy())
    a_s, s_s = np_alpha_sigma(lam_s.numpy())
    ones = torch.ones(4, 1, 1, 1, dtype=torch.float64)
    scale = samplers.forward_step(z_u=ones, logsnr_u=lam_u, logsnr_s=lam_s, noise=torch.zeros_like(ones))
    std = samplers.forward_step(z_u=torch.zeros_like(ones), logsnr_u=lam_u, logsnr_s=lam_s, noise=ones)
    np.testing.assert_allclose(scale.numpy().ravel(), a_s / a_u, rtol=1e-13)
    np.testing.assert_allclose(std.numpy().ravel() ** 2, s_s**2 - (a_s / a_u) ** 2 * s_u**2, rtol=1e-9)
    # from the clean end (lambda = +inf, as a discrete schedule has at t = 0) the variance is sigma_s^2
    inf = torch.full((1,), float("inf"), dtype=torch.float64)
    out = samplers.forward_step(z_u=torch.ones(1, 1, 1, 1, dtype=torch.float64), logsnr_u=inf,
                                logsnr_s=torch.zeros(1, dtype=torch.float64), noise=torch.ones(1, 1, 1, 1))
    assert out.item() == pytest.approx(np.sqrt(0.5) + np.sqrt(0.5), abs=1e-12)
