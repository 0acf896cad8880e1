"""Truncated cosine log-SNR schedule, checked against an independent numpy float64 computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pd_core import schedule

LMIN, LMAX = -20.0, 20.0


def np_logsnr(t: np.ndarray, lmin: float = LMIN, lmax: float = LMAX) -> np.ndarray:
    """DESIGN 2: b = arctan(exp(-lmax/2)), a = arctan(exp(-lmin/2)) - b, lambda = -2 log tan(a t + b)."""
    b = np.arctan(np.exp(-lmax / 2))
    a = np.arctan(np.exp(-lmin / 2)) - b
    return -2.0 * np.log(np.tan(a * np.asarray(t, dtype=np.float64) + b))


def np_alpha_sigma_trig(t: np.ndarray, lmin: float = LMIN, lmax: float = LMAX) -> tuple[np.ndarray, np.ndarray]:
    """The cos/sin form: with u = a t + b, tan(u) = sigma/alpha, so alpha = cos(u), sigma = sin(u)."""
    b = np.arctan(np.exp(-lmax / 2))
    a = np.arctan(np.exp(-lmin / 2)) - b
    u = a * np.asarray(t, dtype=np.float64) + b
    return np.cos(u), np.sin(u)


T_GRID = np.concatenate([np.linspace(0.0, 1.0, 1001), [1e-9, 1 - 1e-9, 0.5 / 4096, 1 - 0.5 / 4096]])


def test_endpoints_float64():
    lam = schedule.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert lam.dtype == torch.float64
    assert abs(lam[0].item() - 20.0) < 1e-9
    assert abs(lam[1].item() + 20.0) < 1e-9


def test_endpoints_other_range():
    lam = schedule.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64), logsnr_min=-10.0, logsnr_max=7.0)
    np.testing.assert_allclose(lam.numpy(), [7.0, -10.0], atol=1e-9)


def test_alpha_at_t1_is_tiny_but_positive():
    lam = schedule.logsnr(torch.tensor([1.0], dtype=torch.float64))
    alpha, sigma = schedule.alpha_sigma(lam)
    # alpha_1 = sqrt(sigmoid(-20)) = 4.54e-5 (design section 2): never exactly 0, no inf/NaN
    assert abs(alpha.item() - math.sqrt(1.0 / (1.0 + math.exp(20.0)))) < 1e-15
    assert 4.53e-5 < alpha.item() < 4.55e-5
    assert sigma.item() < 1.0
    lam32 = schedule.logsnr(torch.tensor([1.0, 0.0]))
    a32, s32 = schedule.alpha_sigma(lam32)
    assert torch.isfinite(lam32).all() and (a32 > 0).all() and (s32 > 0).all()


def test_logsnr_matches_numpy_closed_form():
    t = torch.tensor(T_GRID, dtype=torch.float64)
    np.testing.assert_allclose(schedule.logsnr(t).numpy(), np_logsnr(T_GRID), rtol=0, atol=1e-9)


def test_logsnr_float32_input_keeps_dtype_and_accuracy():
    t32 = torch.linspace(0, 1, 257, dtype=torch.float32)
    lam = schedule.logsnr(t32)
    assert lam.dtype == torch.float32
    # float32 t rounded; compare against float64 lambda at the same float32 t values
    np.testing.assert_allclose(lam.numpy(), np_logsnr(t32.double().numpy()), atol=1e-4)


def test_logsnr_any_shape():
    t = torch.rand(3, 4, 5, dtype=torch.float64)
    lam = schedule.logsnr(t)
    assert lam.shape == (3, 4, 5)
    np.testing.assert_allclose(lam.numpy(), np_logsnr(t.numpy()), atol=1e-9)


def test_variance_preserving():
    lam = schedule.logsnr(torch.tensor(T_GRID, dtype=torch.float64))
    alpha, sigma = schedule.alpha_sigma(lam)
    np.testing.assert_allclose((alpha**2 + sigma**2).numpy(), 1.0, rtol=0, atol=1e-12)
    # and lambda = log(alpha^2 / sigma^2) on the interior (where neither underflows)
    np.testing.assert_allclose(torch.log(alpha**2 / sigma**2).numpy(), lam.numpy(), atol=1e-7)


def test_alpha_sigma_sigmoid_matches_cos_sin_form():
    """alpha^2 = sigmoid(lambda) computed independently in numpy, and = cos^2(a t + b)."""
    lam_np = np_logsnr(T_GRID)
    alpha_np = np.sqrt(1.0 / (1.0 + np.exp(-lam_np)))
    sigma_np = np.sqrt(1.0 / (1.0 + np.exp(lam_np)))
    cos_u, sin_u = np_alpha_sigma_trig(T_GRID)
    alpha, sigma = schedule.alpha_sigma(torch.tensor(lam_np, dtype=torch.float64))
    np.testing.assert_allclose(alpha.numpy(), alpha_np, rtol=1e-12, atol=0)
    np.testing.assert_allclose(sigma.numpy(), sigma_np, rtol=1e-12, atol=0)
    np.testing.assert_allclose(alpha.numpy(), cos_u, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(sigma.numpy(), sin_u, rtol=1e-9, atol=1e-15)


def test_alpha_sigma_extreme_logsnr_finite():
    lam = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(lam)
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
    assert alpha[2].item() == pytest.approx(math.sqrt(0.5), abs=1e-15)
    assert sigma[2].item() == pytest.approx(math.sqrt(0.5), abs=1e-15)


def test_strictly_monotone_decreasing():
    t = torch.tensor(np.linspace(0.0, 1.0, 100_001), dtype=torch.float64)
    lam = schedule.logsnr(t)
    assert (lam[1:] < lam[:-1]).all()
    # the 4096-step student grid (first student of the paper's CIFAR-10 run) also strictly decreases
    lam_grid = schedule.logsnr(torch.arange(8193, dtype=torch.float64) / 8192)
    assert (lam_grid[1:] < lam_grid[:-1]).all()


def test_t_from_logsnr_is_inverse():
    t = torch.tensor(T_GRID, dtype=torch.float64)
    np.testing.assert_allclose(schedule.t_from_logsnr(schedule.logsnr(t)).numpy(), T_GRID, atol=1e-9)
    lam = torch.linspace(-20, 20, 401, dtype=torch.float64)
    np.testing.assert_allclose(schedule.logsnr(schedule.t_from_logsnr(lam)).numpy(), lam.numpy(), atol=1e-8)


def test_network_time_input_is_about_t():
    t = torch.tensor(np.linspace(0, 1, 101), dtype=torch.float64)
    phi = schedule.network_time_input(schedule.logsnr(t))
    # phi = (a t + b) / (pi/2) exactly; a ~ pi/2 - 2b, b = arctan(e^-10) = 4.54e-5
    b = np.arctan(np.exp(-10.0))
    a = np.arctan(np.exp(10.0)) - b
    np.testing.assert_allclose(phi.numpy(), (a * t.numpy() + b) / (np.pi / 2), atol=1e-9)
    np.testing.assert_allclose(phi.numpy(), t.numpy(), atol=1e-4)
    # teacher and student see the same function: half-step time of a student grid point
    t_half = torch.tensor([1.0 - 0.5 / 4], dtype=torch.float64)
    assert schedule.network_time_input(schedule.logsnr(t_half)).item() == pytest.approx(0.875, abs=1e-4)


def test_network_time_input_monotone_increasing_in_t():
    t = torch.tensor(np.linspace(0, 1, 1001), dtype=torch.float64)
    phi = schedule.network_time_input(schedule.logsnr(t))
    assert (phi[1:] > phi[:-1]).all()


@pytest.mark.parametrize("bad", [-1e-3, 1.0 + 1e-3, float("nan"), 2.0, -5.0])
def test_t_out_of_range_raises_naming_t(bad):
    with pytest.raises(ValueError, match=r"\bt\b"):
        schedule.logsnr(torch.tensor([0.5, bad], dtype=torch.float64))


def test_t_out_of_range_scalar_raises():
    with pytest.raises(ValueError, match=r"\bt\b"):
        schedule.logsnr(1.5)


def test_bad_logsnr_range_raises():
    with pytest.raises(ValueError, match="logsnr_min"):
        schedule.logsnr(torch.tensor([0.5]), logsnr_min=5.0, logsnr_max=-5.0)


def test_time_grid():
    g = schedule.time_grid(4, dtype=torch.float64)
    np.testing.assert_array_equal(g.numpy(), [0.0, 0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ValueError, match="num_steps"):
        schedule.time_grid(0)


# Schedule objects: the cosine as an object, discrete DDPM tables (diffusers' alphas_cumprod)


def test_cosine_schedule_object_is_the_module_functions():
    t = torch.tensor(T_GRID, dtype=torch.float64)
    sched = schedule.CosineSchedule(logsnr_min=-12.0, logsnr_max=9.0)
    np.testing.assert_array_equal(sched.logsnr(t).numpy(), schedule.logsnr(t, logsnr_min=-12.0, logsnr_max=9.0).numpy())
    assert schedule.schedule_from_dict(sched.to_dict()) == sched
    assert schedule.schedule_from_dict(None) == schedule.COSINE


def np_alphas_cumprod(beta_schedule: str, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """Independent numpy float64 DDPM tables (Ho et al. 2020 linear; LDM's scaled linear; Nichol & Dhariwal cosine)."""
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), n) ** 2
    else:
        f = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("beta_schedule", schedule.BETA_SCHEDULES)
def test_ddpm_tables_match_numpy_and_diffusers(beta_schedule):
    acp = schedule.ddpm_alphas_cumprod(beta_schedule=beta_schedule, num_train_timesteps=1000)
    np.testing.assert_allclose(acp.numpy(), np_alphas_cumprod(beta_schedule), rtol=1e-12, atol=0)
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule).alphas_cumprod
    np.testing.assert_allclose(acp.numpy(), ref.double().numpy(), rtol=1e-5, atol=1e-7)  # diffusers computes in fp32


def _discrete(beta_schedule: str = "linear", n: int = 1000) -> schedule.DiscreteSchedule:
    return schedule.DiscreteSchedule(np_alphas_cumprod(beta_schedule, n))


@pytest.mark.parametrize("beta_schedule", schedule.BETA_SCHEDULES)
def test_discrete_grid_points_are_the_table_and_t0_is_clean(beta_schedule):
    sched = _discrete(beta_schedule)
    acp = np_alphas_cumprod(beta_schedule)
    k = np.arange(1000)
    lam = sched.logsnr(torch.tensor((k + 1) / 1000.0, dtype=torch.float64)).numpy()  # tau = t T - 1 = k
    np.testing.assert_allclose(lam, np.log(acp / (1 - acp)), rtol=0, atol=1e-9)
    assert math.isinf(sched.logsnr(torch.tensor([0.0], dtype=torch.float64)).item())
    alpha, sigma = schedule.alpha_sigma(sched.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64)))
    assert alpha[0] == 1.0 and sigma[0] == 0.0  # set_alpha_to_one: the clean end
    np.testing.assert_allclose(alpha[1].item() ** 2, acp[-1], rtol=1e-12)


@pytest.mark.parametrize("big_t", [100, 1000, 4000])
def test_discrete_grids_are_diffusers_trailing_timesteps_and_nest_across_halvings(big_t):
    diffusers = pytest.importorskip("diffusers")
    sched = _discrete(n=big_t)
    counts = [n for n in range(1, big_t + 1) if big_t % n == 0 or n & (n - 1) == 0]  # divisors, powers of two
    for n in counts:
        ref = diffusers.DDIMScheduler(num_train_timesteps=big_t, timestep_spacing="trailing")
        ref.set_timesteps(n)
        t = torch.arange(n, 0, -1, dtype=torch.float64) / n
        np.testing.assert_array_equal(sched.timesteps(t).numpy(), ref.timesteps.numpy())
        np.testing.assert_array_equal(sched.timestep(sched.logsnr(t).float()).numpy(), ref.timesteps.numpy())
    for n in range(1, big_t // 2 + 1):  # every N: the grid of N is every other point of the grid of 2N
        coarse = sched.timesteps(torch.arange(1, n + 1, dtype=torch.float64) / n)
        fine = sched.timesteps(torch.arange(1, 2 * n + 1, dtype=torch.float64) / (2 * n))
        assert torch.equal(coarse, fine[1::2])


def test_discrete_times_between_grid_points_take_the_nearest_timestep():
    sched = _discrete("scaled_linear")
    acp = np_alphas_cumprod("scaled_linear")
    tau = np.array([0.25, 10.5, 11.5, 332.333, 998.9])
    lam = sched.logsnr(torch.tensor((tau + 1) / 1000.0, dtype=torch.float64)).numpy()
    k = np.array([0, 11, 11, 332, 999])  # round(tau + 1) - 1, half to even (11.5 -> 12, 12.5 -> 12) as numpy
    np.testing.assert_allclose(lam, np.log(acp[k] / (1 - acp[k])), rtol=0, atol=1e-9)


@pytest.mark.parametrize("beta_schedule", schedule.BETA_SCHEDULES)
def test_timestep_inverts_the_discrete_logsnr(beta_schedule):
    sched = _discrete(beta_schedule)
    t = torch.tensor(np.random.default_rng(0).uniform(1 / 1000, 1.0, 500), dtype=torch.float64)
    tau = sched.timestep(sched.logsnr(t).float())  # float32 log-SNR, as the samplers hand it to the network
    np.testing.assert_array_equal(tau.double().numpy(), np.round(t.numpy() * 1000) - 1)
    table = sched.table
    mid = (table[10] + table[11]) / 2  # between table points: linear in tau
    assert abs(float(sched.timestep(mid[None])) - 10.5) < 1e-3


def test_ddim_destination_is_diffusers_previous_timestep():
    sched = _discrete(n=100)
    t = torch.arange(1, 9, dtype=torch.float64) / 8  # trailing timesteps round(12.5 i) - 1
    dest = schedule.ddim_destination(sched, t, num_steps=8)  # tau - 100 // 8
    k = np.array([11, 24, 37, 49, 61, 74, 87, 99]) - 12
    assert math.isinf(dest[0]) and k[0] < 0
    np.testing.assert_allclose(dest[1:].numpy(), sched.table[k[1:]].numpy(), rtol=0, atol=0)
    cos = schedule.ddim_destination(schedule.COSINE, t, num_steps=8)
    assert math.isinf(cos[0])
    np.testing.assert_allclose(cos[1:].numpy(), schedule.logsnr(t[:-1]).numpy(), rtol=0, atol=1e-12)


def test_discrete_refuses_times_finer_than_its_timesteps_and_bad_tables():
    sched = _discrete(n=100)
    with pytest.raises(ValueError, match="finer than the model's timesteps"):
        sched.logsnr(torch.tensor([0.005]))
    sched.logsnr(torch.tensor([0.0, 0.01, 1.0]))  # 0, 1/T and 1 are fine
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedule.DiscreteSchedule([0.9, 0.95])
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        schedule.DiscreteSchedule([1.0, 0.5])
    assert schedule.schedule_from_dict(sched.to_dict()) == sched
    with pytest.raises(ValueError, match="kind"):
        schedule.schedule_from_dict({"kind": "sigmoid"})
