"""Tests for diffcap.diffusion.schedule: shape, monotonicity and the closed forms of each schedule."""

from __future__ import annotations

import math

import pytest
import torch

from diffcap.diffusion.schedule import SCHEDULES, alpha_bar


def _cosine_f(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def _sqrt_f(s: float) -> float:
    return 1.0 - math.sqrt(s + 1e-4)


def _cases():
    for schedule in SCHEDULES:
        for timesteps in (2, 10, 50, 1000, 4000, 12000):
            if schedule == "sqrt" and timesteps > 10000:
                continue  # refused with a clear error, see test_sqrt_refuses_too_many_steps
            yield pytest.param(schedule, timesteps, id=f"{schedule}-{timesteps}")


def test_sqrt_refuses_too_many_steps() -> None:
    with pytest.raises(ValueError, match="at most 10000"):
        alpha_bar("sqrt", 12000)


@pytest.mark.parametrize("schedule, timesteps", list(_cases()))
def test_strictly_decreasing_within_unit_interval(schedule: str, timesteps: int) -> None:
    ab = alpha_bar(schedule, timesteps)
    assert ab.shape == (timesteps,) and ab.dtype == torch.float64
    assert torch.isfinite(ab).all()
    assert bool(torch.all(ab[1:] < ab[:-1])), "alpha_bar must decrease strictly"
    assert bool(torch.all(ab > 0)) and bool(torch.all(ab < 1))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_starts_near_one_ends_near_zero(schedule: str) -> None:
    ab = alpha_bar(schedule, 1000)
    assert float(ab[0]) > 0.97  # sqrt adds the most noise early (1 - sqrt(1e-3 + 1e-4) ~ 0.967 relative)
    assert float(ab[-1]) < 1e-4
    # signal-to-noise ratio spans many orders of magnitude
    snr = ab / (1 - ab)
    assert float(snr[0]) > 30 and float(snr[-1]) < 1e-4


def test_cosine_closed_form() -> None:
    T = 1000
    ab = alpha_bar("cosine", T)
    for t in (0, 1, 10, 250, 500, 900, 998):
        expected = _cosine_f((t + 1) / T) / _cosine_f(0.0)
        assert float(ab[t]) == pytest.approx(expected, rel=1e-9), t
    # only the very last beta is clipped (f(1) = 0 would make beta = 1): beta_{T-1} = 0.999
    assert float(ab[-1] / ab[-2]) == pytest.approx(1 - 0.999, rel=1e-9)
    # the discrete schedule follows the continuous cos^2 curve closely in the middle
    assert float(ab[499]) == pytest.approx(_cosine_f(0.5) / _cosine_f(0.0), rel=1e-9)
    assert float(ab[499]) == pytest.approx(0.4940, abs=1e-3)


def test_cosine_small_T_uses_same_curve() -> None:
    ab = alpha_bar("cosine", 4)
    for t in range(3):
        assert float(ab[t]) == pytest.approx(_cosine_f((t + 1) / 4) / _cosine_f(0.0), rel=1e-9)


def test_linear_closed_form() -> None:
    ab = alpha_bar("linear", 1000)
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(ab, expected, rtol=1e-12, atol=0)
    assert float(ab[-1]) == pytest.approx(4.0358e-05, rel=1e-3)  # the familiar DDPM value


def test_linear_rescaled_for_other_T() -> None:
    ab = alpha_bar("linear", 2000)
    expected = torch.cumprod(1 - torch.linspace(0.5e-4, 0.01, 2000, dtype=torch.float64), 0)
    torch.testing.assert_close(ab, expected, rtol=1e-12, atol=0)


def test_sqrt_closed_form() -> None:
    T = 1000
    ab = alpha_bar("sqrt", T)
    for t in (0, 5, 100, 500, 998):
        expected = _sqrt_f((t + 1) / T) / _sqrt_f(0.0)
        assert float(ab[t]) == pytest.approx(expected, rel=1e-9), t


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_more_steps_same_curve(schedule: str) -> None:
    """The schedules are discretisations of one curve: T=2000 at 2t+1 ~ T=1000 at t (away from the end)."""
    a, b = alpha_bar(schedule, 1000), alpha_bar(schedule, 2000)
    for t in (100, 400, 700):
        assert float(b[2 * t + 1]) == pytest.approx(float(a[t]), rel=0.02)


@pytest.mark.parametrize("bad", ["quadratic", "Cosine", ""])
def test_unknown_schedule(bad: str) -> None:
    with pytest.raises(ValueError, match="cosine, linear, sqrt"):
        alpha_bar(bad, 1000)


@pytest.mark.parametrize("timesteps", [1, 0, -5])
def test_too_few_timesteps(timesteps: int) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        alpha_bar("cosine", timesteps)
