"""Noise schedules: the cumulative signal level alpha_bar(t) for t = 0..T-1.

x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps. All schedules are strictly decreasing from close to
1 (almost clean) at t = 0 to close to 0 (almost pure noise) at t = T-1.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "sqrt")
_MAX_BETA = 0.999


def _from_alpha_bar_fn(fn, timesteps: int) -> torch.Tensor:
    """Discretise a continuous alpha_bar(s), s in [0, 1], the improved-diffusion way (betas clipped)."""
    betas = []
    for i in range(timesteps):
        s0, s1 = i / timesteps, (i + 1) / timesteps
        betas.append(min(1.0 - fn(s1) / fn(s0), _MAX_BETA))
    return torch.cumprod(1.0 - torch.tensor(betas, dtype=torch.float64), dim=0)


def alpha_bar(schedule: str, timesteps: int) -> torch.Tensor:
    """(T,) float64 cumulative products of (1 - beta_t)."""
    if timesteps < 2:
        raise ValueError(f"timesteps must be at least 2, got {timesteps}")
    if schedule == "cosine":  # Nichol & Dhariwal 2021, s = 0.008
        return _from_alpha_bar_fn(lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2, timesteps)
    if schedule == "sqrt":  # Diffusion-LM: alpha_bar = 1 - sqrt(s + 1e-4); more noise early
        if timesteps > 10_000:  # the curve reaches 0 at s = 0.9999: finer grids would divide by zero
            raise ValueError(f"the sqrt schedule supports at most 10000 timesteps, got {timesteps}")
        return _from_alpha_bar_fn(lambda s: 1.0 - math.sqrt(s + 1e-4), timesteps)
    if schedule == "linear":  # Ho et al. 2020, betas 1e-4 .. 0.02 rescaled to T steps
        scale = 1000 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=_MAX_BETA)
        return torch.cumprod(1.0 - betas, dim=0)
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
