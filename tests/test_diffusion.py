"""Tests for diffcap.diffusion.gaussian: forward process statistics, timestep respacing and the DDIM sampler.

The sampler outputs for two fixed dummy denoisers are stored as literals (checked once against an independent
float64 implementation of Song et al. eq. 12), so any change to the sampler math shows up here.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffcap.diffusion.gaussian import GaussianDiffusion
from diffcap.diffusion.schedule import alpha_bar


def plain_denoiser(x: torch.Tensor, t: torch.Tensor, sc: torch.Tensor | None) -> torch.Tensor:
    return 0.5 * x + 0.01 * t.float().view(-1, 1, 1)


def self_cond_denoiser(x: torch.Tensor, t: torch.Tensor, sc: torch.Tensor | None) -> torch.Tensor:
    out = 0.5 * x + 0.001 * t.float().view(-1, 1, 1)
    return out if sc is None else out + 0.3 * sc


# cosine, T=100, S=5 (timesteps 99, 74, 50, 25, 0), shape (2, 2, 3), torch.Generator().manual_seed(0)
EXPECTED_PLAIN = [0.702591, 0.26272, -0.189364, 0.469383, 0.073026, -0.002284,
                  0.429798, 0.534028, 0.160612, 0.236364, 0.190015, 0.37673]
EXPECTED_SELF_COND = [1.055147, -0.088942, -1.264798, 0.44858, -0.582329, -0.778209,
                      0.345621, 0.616721, -0.354522, -0.157493, -0.278045, 0.207595]
EXPECTED_PLAIN_ETA1 = [0.221428, 0.490012, 0.081399, 0.16599, 0.257055, 0.314865,
                       0.301016, -0.02643, 0.238071, 0.460626, 0.201531, 0.396059]
SHAPE = (2, 2, 3)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion.from_schedule("cosine", 100)


def _sample(diffusion, fn, *, eta=0.0, seed=0, **kwargs):
    return diffusion.sample(fn, SHAPE, 5, eta=eta, generator=torch.Generator().manual_seed(seed), **kwargs)


# -- construction -------------------------------------------------------------------------------------------


def test_rejects_bad_alpha_bars() -> None:
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.9, 0.95, 0.1], dtype=torch.float64))  # not decreasing
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.9, 0.5, 0.0], dtype=torch.float64))  # reaches 0
    with pytest.raises(ValueError):
        GaussianDiffusion(torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(ValueError):
        GaussianDiffusion.from_schedule("quadratic", 100)


def test_from_schedule(diffusion) -> None:
    assert diffusion.num_timesteps == 100
    torch.testing.assert_close(diffusion.alpha_bars, alpha_bar("cosine", 100), rtol=0, atol=0)


# -- forward process ----------------------------------------------------------------------------------------


def test_q_sample_statistics() -> None:
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000)
    n = 200_000
    t = torch.tensor([0, 250, 600, 999])
    x0 = torch.tensor([1.5, -2.0, 0.7, 3.0], dtype=torch.float64).view(4, 1, 1).expand(4, 1, n)
    noise = torch.randn((4, 1, n), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_t = diffusion.q_sample(x0, t, noise)
    assert x_t.shape == x0.shape
    for row in range(4):
        ab = float(diffusion.alpha_bars[t[row]])
        values = x_t[row].flatten()
        var = 1 - ab
        mean_se = math.sqrt(var / n)
        var_se = var * math.sqrt(2 / (n - 1))
        assert float(values.mean()) == pytest.approx(math.sqrt(ab) * float(x0[row, 0, 0]), abs=5 * mean_se)
        assert float(values.var()) == pytest.approx(var, abs=5 * var_se)


def test_q_sample_exact_coefficients(diffusion) -> None:
    x0 = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 40, 99])
    x_t = diffusion.q_sample(x0, t, noise)
    for i in range(3):
        ab = float(diffusion.alpha_bars[t[i]])
        torch.testing.assert_close(x_t[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i])


def test_sample_timesteps_range(diffusion) -> None:
    t = diffusion.sample_timesteps(10_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == 99


# -- respacing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 7, 100, 1000])
def test_sampling_timesteps(T: int) -> None:
    diffusion = GaussianDiffusion.from_schedule("cosine", T)
    for steps in sorted({min(v, T) for v in (1, 2, 3, T // 3 or 1, T // 2 or 1, T - 1 or 1, T)}):
        times = diffusion.sampling_timesteps(steps)
        assert len(times) == steps, (T, steps)
        assert len(set(times)) == steps
        assert times[0] == T - 1
        assert all(a > b for a, b in zip(times, times[1:]))
        if steps > 1:
            assert times[-1] == 0
        assert all(isinstance(v, int) for v in times)
    assert diffusion.sampling_timesteps(1) == [T - 1]
    assert diffusion.sampling_timesteps(T) == list(range(T - 1, -1, -1))


def test_sampling_timesteps_evenly_spaced() -> None:
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000)
    assert diffusion.sampling_timesteps(5) == [999, 749, 500, 250, 0]
    gaps = [a - b for a, b in zip(diffusion.sampling_timesteps(20), diffusion.sampling_timesteps(20)[1:])]
    assert max(gaps) - min(gaps) <= 1


@pytest.mark.parametrize("steps", [0, -1, 101])
def test_sampling_timesteps_out_of_range(diffusion, steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        diffusion.sampling_timesteps(steps)


# -- sampler against stored numbers -------------------------------------------------------------------------


def test_sample_stored_plain(diffusion) -> None:
    result = _sample(diffusion, plain_denoiser)
    assert result.x0.shape == SHAPE and result.x0.dtype == torch.float32
    torch.testing.assert_close(result.x0.flatten(), torch.tensor(EXPECTED_PLAIN), rtol=0, atol=1e-5)


def test_sample_stored_self_condition(diffusion) -> None:
    result = _sample(diffusion, self_cond_denoiser)
    torch.testing.assert_close(result.x0.flatten(), torch.tensor(EXPECTED_SELF_COND), rtol=0, atol=1e-5)
    # with self-conditioning off the model never sees a previous estimate
    off = _sample(diffusion, self_cond_denoiser, self_condition=False)
    assert (off.x0.flatten() - torch.tensor(EXPECTED_SELF_COND)).abs().max() > 1e-2


def test_sample_stored_eta1(diffusion) -> None:
    result = _sample(diffusion, plain_denoiser, eta=1.0)
    torch.testing.assert_close(result.x0.flatten(), torch.tensor(EXPECTED_PLAIN_ETA1), rtol=0, atol=1e-5)


def test_eta0_is_deterministic_given_start_noise(diffusion) -> None:
    a = _sample(diffusion, plain_denoiser, seed=5)
    b = _sample(diffusion, plain_denoiser, seed=5)
    c = _sample(diffusion, plain_denoiser, seed=6)
    torch.testing.assert_close(a.x0, b.x0, rtol=0, atol=0)
    assert not torch.allclose(a.x0, c.x0)


def test_eta1_reproducible_and_stochastic(diffusion) -> None:
    a = _sample(diffusion, plain_denoiser, eta=1.0, seed=5)
    b = _sample(diffusion, plain_denoiser, eta=1.0, seed=5)
    c = _sample(diffusion, plain_denoiser, eta=1.0, seed=6)
    d = _sample(diffusion, plain_denoiser, eta=0.0, seed=5)
    torch.testing.assert_close(a.x0, b.x0, rtol=0, atol=0)
    assert not torch.allclose(a.x0, c.x0)
    assert not torch.allclose(a.x0, d.x0)  # fresh noise was added


def test_true_x0_denoiser_returns_it(diffusion) -> None:
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    for eta in (0.0, 1.0):
        result = _sample(diffusion, lambda x, t, sc: target.clone(), eta=eta)
        torch.testing.assert_close(result.x0, target, rtol=0, atol=0)


def test_denoised_fn_applied_every_step_and_trajectory(diffusion) -> None:
    calls: list[torch.Tensor] = []
    seen_self_cond: list[torch.Tensor | None] = []

    def denoised_fn(x0: torch.Tensor) -> torch.Tensor:
        calls.append(x0.clone())
        return torch.round(x0 * 4) / 4  # a visible "clamp"

    def model(x, t, sc):
        seen_self_cond.append(None if sc is None else sc.clone())
        return 0.5 * x

    result = diffusion.sample(model, SHAPE, 7, denoised_fn=denoised_fn, keep_trajectory=True,
                              generator=torch.Generator().manual_seed(0))
    assert len(calls) == 7
    times = diffusion.sampling_timesteps(7)
    assert [t for t, _ in result.trajectory] == times
    for _, x0_hat in result.trajectory:  # every recorded prediction went through denoised_fn
        torch.testing.assert_close(x0_hat, torch.round(x0_hat * 4) / 4, rtol=0, atol=0)
    torch.testing.assert_close(result.x0, result.trajectory[-1][1], rtol=0, atol=0)
    # the self-conditioning input is the previous *clamped* prediction
    assert seen_self_cond[0] is None
    for i in range(1, 7):
        torch.testing.assert_close(seen_self_cond[i], result.trajectory[i - 1][1], rtol=0, atol=0)


def test_no_trajectory_by_default(diffusion) -> None:
    assert _sample(diffusion, plain_denoiser).trajectory == []


def test_model_sees_timesteps_and_time_difference(diffusion) -> None:
    seen: list[list[int]] = []

    def model(x, t, sc):
        assert t.dtype == torch.long and t.shape == (SHAPE[0],)
        seen.append(t.tolist())
        return 0.5 * x

    diffusion.sample(model, SHAPE, 5, generator=torch.Generator().manual_seed(0))
    assert seen == [[t, t] for t in [99, 74, 50, 25, 0]]
    seen.clear()
    diffusion.sample(model, SHAPE, 5, time_difference=10, generator=torch.Generator().manual_seed(0))
    assert seen == [[t, t] for t in [99, 84, 60, 35, 10]]  # t + 10, capped at T - 1


def test_sample_dtype(diffusion) -> None:
    result = diffusion.sample(plain_denoiser, SHAPE, 3, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(0))
    assert result.x0.dtype == torch.float64


# -- DDIM step ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t, s", [(99, 0), (99, 50), (60, 59), (30, 1)])
def test_ddim_consistency(diffusion, t: int, s: int) -> None:
    """With the true x0 and eta=0 the update lands exactly on q_sample(x0, s, the same noise)."""
    gen = torch.Generator().manual_seed(t)
    x0 = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    x_t = diffusion.q_sample(x0, torch.full((2,), t), noise)
    x_s = diffusion.ddim_step(x_t, x0, t, s, 0.0, None)
    torch.testing.assert_close(x_s, diffusion.q_sample(x0, torch.full((2,), s), noise), rtol=1e-10, atol=1e-10)


def test_ddim_eta1_marginal_variance() -> None:
    """With eta=1 and the true x0, x_s keeps the forward marginal: mean sqrt(ab_s) x0, variance 1 - ab_s."""
    diffusion = GaussianDiffusion.from_schedule("cosine", 100)
    n, t, s = 100_000, 80, 40
    x0 = torch.full((1, 1, n), 0.8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn((1, 1, n), generator=gen, dtype=torch.float64)
    x_t = diffusion.q_sample(x0, torch.tensor([t]), noise)
    x_s = diffusion.ddim_step(x_t, x0, t, s, 1.0, gen)
    ab_s = float(diffusion.alpha_bars[s])
    var = 1 - ab_s
    assert float(x_s.mean()) == pytest.approx(math.sqrt(ab_s) * 0.8, abs=5 * math.sqrt(var / n))
    assert float(x_s.var()) == pytest.approx(var, abs=5 * var * math.sqrt(2 / (n - 1)))


# -- training -----------------------------------------------------------------------------------------------


def test_training_prediction_with_self_condition(diffusion) -> None:
    net = torch.nn.Linear(3, 3)
    calls: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

    def model(x, t, sc):
        out = net(x) + (0 if sc is None else sc)
        calls.append((x.clone(), sc, out))
        return out

    x0 = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 90])
    pred = diffusion.training_prediction(model, x0, t, noise, use_self_condition=True)
    x_t, x0_hat = pred.x_t, pred.x0_hat
    torch.testing.assert_close(x_t, diffusion.q_sample(x0, t, noise))
    torch.testing.assert_close(pred.target, x0, rtol=0, atol=0)  # the default target is x0
    assert len(calls) == 2
    assert calls[0][1] is None
    torch.testing.assert_close(calls[1][1], calls[0][2].detach(), rtol=0, atol=0)
    assert not calls[1][1].requires_grad  # the first pass runs without gradient
    torch.testing.assert_close(calls[0][0], x_t, rtol=0, atol=0)
    torch.testing.assert_close(calls[1][0], x_t, rtol=0, atol=0)
    assert x0_hat is calls[1][2] and x0_hat.requires_grad
    x0_hat.sum().backward()
    assert net.weight.grad is not None


def test_training_prediction_without_self_condition(diffusion) -> None:
    calls = []

    def model(x, t, sc):
        calls.append(sc)
        return 0.5 * x

    x0 = torch.ones(2, 4, 3)
    pred = diffusion.training_prediction(model, x0, torch.tensor([5, 6]), torch.zeros(2, 4, 3), False)
    assert calls == [None]
    torch.testing.assert_close(pred.x0_hat, 0.5 * pred.x_t)


# -- prediction targets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["x0", "eps", "x_prev"])
def test_to_x0_inverts_the_target(target: str) -> None:
    diffusion = GaussianDiffusion.from_schedule("cosine", 200, target=target, interval=30)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 3, generator=g, dtype=torch.float64), torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 29, 30, 120, 199])  # below and above the x_prev interval
    x_t = diffusion.q_sample(x0, t, noise)
    out = diffusion.network_target(x0, t, noise)
    torch.testing.assert_close(diffusion.to_x0(out, x_t, t), x0)
    if target == "x_prev":  # x_{t-30} for t >= 30, x0 below
        torch.testing.assert_close(out[3:], diffusion.q_sample(x0[3:], t[3:] - 30, noise[3:]))
        torch.testing.assert_close(out[:3], x0[:3])
    if target == "eps":
        torch.testing.assert_close(out, noise)


@pytest.mark.parametrize("target", ["x0", "eps", "x_prev"])
def test_sampler_recovers_x0_from_an_oracle_of_any_target(target: str) -> None:
    """A network that outputs the exact target for a known x0 makes the sampler land on that x0."""
    diffusion = GaussianDiffusion.from_schedule("cosine", 200, target=target, interval=30)
    x0 = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def oracle(x_t, t, sc):
        signal, sigma = diffusion._coef(t, x_t)
        noise = (x_t - signal * x0) / sigma  # the noise that makes x_t from x0
        return diffusion.network_target(x0, t, noise)

    result = diffusion.sample(oracle, (2, 4, 3), 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(result.x0, x0)


def test_invalid_targets_are_refused() -> None:
    with pytest.raises(ValueError, match="target"):
        GaussianDiffusion.from_schedule("cosine", 100, target="v")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval"):
        GaussianDiffusion.from_schedule("cosine", 100, target="x_prev", interval=100)


def _gaussian_oracle(diffusion: GaussianDiffusion, scale: float):
    """The exact x0 predictor E[x0 | x_t] for data x0 ~ N(0, scale^2) per coordinate."""

    def model(x_t: torch.Tensor, t: torch.Tensor, self_cond: torch.Tensor | None) -> torch.Tensor:
        ab = diffusion.alpha_bars[t].to(x_t.dtype).view(-1, 1, 1)
        return ab.sqrt() * scale**2 / (ab * scale**2 + 1 - ab) * x_t

    return model


def test_dpmpp_2m_is_a_second_order_solver_of_the_probability_flow_ode() -> None:
    """For Gaussian data the ODE's solution is known (the flow only rescales: x_t / sqrt(ab_t s^2 + 1 - ab_t) stays
    constant). With the exact denoiser, doubling the steps must cut DDIM's error about 2x (first order) and
    DPM-Solver++(2M)'s about 4x (second order), and the latter must be far more accurate at equal steps."""
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000)
    scale = 1.0
    oracle = _gaussian_oracle(diffusion, scale)
    x_T = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ab_T, ab_0 = float(diffusion.alpha_bars[-1]), float(diffusion.alpha_bars[0])
    x_0 = x_T * math.sqrt(ab_0 * scale**2 + 1 - ab_0) / math.sqrt(ab_T * scale**2 + 1 - ab_T)
    exact = oracle(x_0, torch.zeros(4, dtype=torch.long), None)  # the sampler returns the x0 estimate at t = 0

    def error(solver: str, steps: int) -> float:
        x0 = diffusion.sample(oracle, tuple(x_T.shape), steps, self_condition=False, noise=x_T, dtype=torch.float64,
                              solver=solver).x0
        return float((x0 - exact).abs().max())

    ddim_order = math.log2(error("ddim", 100) / error("ddim", 200))
    dpm_order = math.log2(error("dpmpp_2m", 100) / error("dpmpp_2m", 200))
    assert 0.7 < ddim_order < 1.3 and dpm_order > 1.7, (ddim_order, dpm_order)
    assert error("dpmpp_2m", 200) < 0.1 * error("ddim", 200)


def test_dpmpp_2m_first_step_is_ddim_and_bad_solvers_are_refused(diffusion) -> None:
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    t, s = diffusion.num_timesteps - 1, diffusion.num_timesteps // 2
    assert torch.allclose(diffusion.dpmpp_2m_step(x, x0, t, s, None), diffusion.ddim_step(x, x0, t, s, 0.0, None),
                          atol=1e-5)
    model = lambda x_t, t, sc: torch.zeros_like(x_t)  # noqa: E731
    with pytest.raises(ValueError, match="unknown solver"):
        diffusion.sample(model, (1, 2, 3), 2, solver="euler")
    with pytest.raises(ValueError, match="eta > 0"):
        diffusion.sample(model, (1, 2, 3), 2, solver="dpmpp_2m", eta=1.0)


def test_trailing_spacing_spends_no_step_at_t0() -> None:
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000)
    assert diffusion.sampling_timesteps(2, "trailing") == [999, 499]
    assert diffusion.sampling_timesteps(5, "trailing") == [999, 799, 599, 399, 199]
    assert diffusion.sampling_timesteps(1, "trailing") == [999]
    assert diffusion.sampling_timesteps(1000, "trailing") == list(range(999, -1, -1))
    assert diffusion.sampling_timesteps(2) == [999, 0]  # linspace: the second call only sees the clean estimate
    seen = []
    model = lambda x_t, t, sc: seen.append(int(t[0])) or torch.zeros_like(x_t)  # noqa: E731
    diffusion.sample(model, (1, 2, 3), 4, spacing="trailing")
    assert seen == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        diffusion.sampling_timesteps(3, "log")
