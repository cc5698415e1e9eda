"""Gaussian diffusion on continuous sequences, as a small pure object.

It knows the noise schedule and what the network predicts, and nothing else: the network is passed in as a
function `model(x_t, t, self_cond) -> output`, text and images are invisible here, and the only hook into the
domain is `denoised_fn`, applied to every predicted x0 during sampling (where the text space's clamping
to the nearest word embeddings goes).

What the network's output means is the `target` (improved-diffusion's ModelMeanType, extended):

- "x0": the clean latents (default; Diffusion-LM's x0-parameterisation);
- "eps": the noise that was added;
- "x_prev": x_{t-k}, the same sample k levels less noisy (`interval` = k; the original's X_INTERVAL),
  built with the same noise, and x0 itself when t < k.

`to_x0` turns any output into the x0 estimate used for self-conditioning, rounding and sampling. Modelled on openai/improved-diffusion's `GaussianDiffusion` and
its `respace.py`: any number of sampling steps S <= T is a sampling-time choice, no retraining.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from diffcap.diffusion.schedule import alpha_bar

# model(x_t (B, L, D), t (B,) long, self_cond (B, L, D) or None) -> output (B, L, D), meaning set by the target
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Target = Literal["x0", "eps", "x_prev"]
TARGETS = ("x0", "eps", "x_prev")
SOLVERS = ("ddim", "dpmpp_2m")
SPACINGS = ("linspace", "trailing")


@dataclass
class TrainingPrediction:
    x_t: torch.Tensor  # (B, L, D) the noised input
    output: torch.Tensor  # (B, L, D) what the network returned
    target: torch.Tensor  # (B, L, D) what it should have returned
    x0_hat: torch.Tensor  # (B, L, D) the output as an estimate of x0


@dataclass
class SampleResult:
    x0: torch.Tensor  # (B, L, D) the final prediction
    # (t, predicted x0 after denoised_fn) at every step, when asked for
    trajectory: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class GaussianDiffusion:
    def __init__(self, alpha_bars: torch.Tensor, target: Target = "x0", interval: int = 30) -> None:
        if alpha_bars.ndim != 1 or len(alpha_bars) < 2:
            raise ValueError("alpha_bars must be a 1-D tensor of at least 2 levels")
        if not bool(torch.all(alpha_bars[1:] < alpha_bars[:-1])) or not (0 < float(alpha_bars[-1]) < 1):
            raise ValueError("alpha_bars must decrease strictly and stay within (0, 1)")
        if target not in TARGETS:
            raise ValueError(f"unknown prediction target {target!r}; choose one of: {', '.join(TARGETS)}")
        if target == "x_prev" and not 1 <= interval < len(alpha_bars):
            raise ValueError(f"interval must be between 1 and {len(alpha_bars) - 1}, got {interval}")
        self.alpha_bars = alpha_bars.to(torch.float64)
        self.target = target
        self.interval = interval

    @classmethod
    def from_schedule(cls, schedule: str, timesteps: int, target: Target = "x0", interval: int = 30) -> GaussianDiffusion:
        return cls(alpha_bar(schedule, timesteps), target, interval)

    @property
    def num_timesteps(self) -> int:
        return len(self.alpha_bars)

    def _coef(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped (B, 1, 1) to broadcast over (B, L, D)."""
        ab = self.alpha_bars.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
        return ab.sqrt(), (1 - ab).sqrt()

    # -- forward process ---------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)."""
        signal, sigma = self._coef(t, x0)
        return signal * x0 + sigma * noise

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    # -- what the network predicts -----------------------------------------------------------------------
    def network_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = q_sample(x0, t, noise)."""
        if self.target == "x0":
            return x0
        if self.target == "eps":
            return noise
        s = t - self.interval
        x_s = self.q_sample(x0, s.clamp(min=0), noise)
        return torch.where((s >= 0).view(-1, *([1] * (x0.ndim - 1))), x_s, x0)

    def to_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output at level t (B,) read as an estimate of x0."""
        if self.target == "x0":
            return output
        signal_t, sigma_t = self._coef(t, x_t)
        if self.target == "eps":
            return (x_t - sigma_t * output) / signal_t
        # x_t = a_t x0 + b_t eps and x_s = a_s x0 + b_s eps (same eps): solve for x0
        s = t - self.interval
        signal_s, sigma_s = self._coef(s.clamp(min=0), x_t)
        x0 = (sigma_t * output - sigma_s * x_t) / (sigma_t * signal_s - sigma_s * signal_t)
        return torch.where((s >= 0).view(-1, *([1] * (x_t.ndim - 1))), x0, output)

    def training_prediction(
        self,
        model: DenoiseFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        use_self_condition: bool,
    ) -> TrainingPrediction:
        """Network input, output, target and x0 estimate for one training step.

        With `use_self_condition` (the caller draws it with probability p, per batch), a first pass without
        gradient predicts x0, which the second pass receives as its self-conditioning input (Analog Bits).
        """
        x_t = self.q_sample(x0, t, noise)
        self_cond = None
        if use_self_condition:
            with torch.no_grad():
                self_cond = self.to_x0(model(x_t, t, None), x_t, t).detach()
        output = model(x_t, t, self_cond)
        return TrainingPrediction(x_t, output, self.network_target(x0, t, noise), self.to_x0(output, x_t, t))

    # -- reverse process ---------------------------------------------------------------------------------
    def sampling_timesteps(self, steps: int, spacing: str = "linspace") -> list[int]:
        """S timesteps from T-1 down: "linspace" ends at 0; "trailing" (Lin et al. 2024) at T/S - 1, so that no
        network call is spent at t = 0, where x_t is already the clean estimate and the call only echoes it."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_timesteps}, got {steps}")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
        T = self.num_timesteps
        if spacing == "trailing":
            return list(dict.fromkeys(round(T - i * T / steps) - 1 for i in range(steps)))
        if steps == 1:
            return [self.num_timesteps - 1]
        grid = torch.linspace(self.num_timesteps - 1, 0, steps).round().long().tolist()
        return list(dict.fromkeys(grid))  # unique, order kept

    @torch.no_grad()
    def sample(
        self,
        model: DenoiseFn,
        shape: tuple[int, ...],
        steps: int,
        *,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        self_condition: bool = True,
        eta: float = 0.0,
        time_difference: int = 0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        keep_trajectory: bool = False,
        noise: torch.Tensor | None = None,
        solver: str = "ddim",
        spacing: str = "linspace",
    ) -> SampleResult:
        """Generate from pure noise with S re-noising steps.

        At each step the network predicts x0 from x_t (told a time `time_difference` later than t),
        `denoised_fn` adjusts it, and x_s at the next, smaller timestep s is rebuilt from it: by the DDIM update
        (`solver="ddim"`; eta > 0 adds fresh noise), or by DPM-Solver++(2M) (`"dpmpp_2m"`, Lu et al. 2022), a
        second-order multistep solver of the same ODE in data-prediction form that extrapolates from the last two
        x0 estimates: the same network calls, a smaller error per step, so fewer steps for the same result.
        `spacing` places the S timesteps (`sampling_timesteps`).
        """
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
        if solver != "ddim" and eta > 0:
            raise ValueError(f"eta > 0 (fresh noise) needs the ddim solver, not {solver!r}")
        if noise is not None:  # the caller's x_T
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            x = noise.to(device=device, dtype=dtype)
        else:  # drawn on the CPU generator: the same noise on any device
            x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        times = self.sampling_timesteps(steps, spacing)
        result = SampleResult(x0=x)
        x0_hat: torch.Tensor | None = None
        previous: tuple[int, torch.Tensor] | None = None  # (t, x0 estimate) of the step before, for dpmpp_2m
        for i, t in enumerate(times):
            t_model = min(t + time_difference, self.num_timesteps - 1)
            t_batch = torch.full((shape[0],), t_model, dtype=torch.long, device=device)
            output = model(x, t_batch, x0_hat if self_condition else None)
            x0_hat = self.to_x0(output.to(x.dtype), x, torch.full_like(t_batch, t))
            if denoised_fn is not None:
                x0_hat = denoised_fn(x0_hat)
            if keep_trajectory:
                result.trajectory.append((t, x0_hat.detach().clone()))
            if i + 1 < len(times):
                if solver == "dpmpp_2m":
                    x = self.dpmpp_2m_step(x, x0_hat, t, times[i + 1], previous)
                    previous = (t, x0_hat)
                else:
                    x = self.ddim_step(x, x0_hat, t, times[i + 1], eta, generator)
        assert x0_hat is not None
        result.x0 = x0_hat
        return result

    def _log_snr(self, t: int) -> float:
        """lambda_t = log(alpha_t / sigma_t), the half log signal-to-noise ratio."""
        ab = float(self.alpha_bars[t])
        return 0.5 * (math.log(ab) - math.log1p(-ab))

    def dpmpp_2m_step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: int, s: int,
                      previous: tuple[int, torch.Tensor] | None) -> torch.Tensor:
        """x_s from x_t by DPM-Solver++(2M): x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) D, h = lambda_s -
        lambda_t, with D = x0_hat (first order, which is exactly DDIM) or, given the previous step's (t', x0'),
        the extrapolation D = (1 + 1/2r) x0_hat - 1/2r x0', r = (lambda_t - lambda_t') / h."""
        ab_t, ab_s = float(self.alpha_bars[t]), float(self.alpha_bars[s])
        h = self._log_snr(s) - self._log_snr(t)
        d = x0_hat
        if previous is not None:
            t_prev, x0_prev = previous
            r = (self._log_snr(t) - self._log_snr(t_prev)) / h
            d = (1 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev
        return ((1 - ab_s) / (1 - ab_t)) ** 0.5 * x_t - ab_s**0.5 * math.expm1(-h) * d

    def ddim_step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: int, s: int, eta: float,
                  generator: torch.Generator | None) -> torch.Tensor:
        """x_s from x_t and the predicted x0 (Song et al. 2021, eq. 12), s < t."""
        ab_t, ab_s = float(self.alpha_bars[t]), float(self.alpha_bars[s])
        eps = (x_t - ab_t ** 0.5 * x0_hat) / (1 - ab_t) ** 0.5
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)) ** 0.5
        x_s = ab_s ** 0.5 * x0_hat + max(1 - ab_s - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x_s = x_s + sigma * torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
        return x_s
