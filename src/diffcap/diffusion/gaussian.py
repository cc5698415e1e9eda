"""Gaussian diffusion on continuous sequences, as a small pure object.

It knows the noise schedule and nothing else: the network is passed in as a function
`model(x_t, t, self_cond) -> x0_hat`, text and images are invisible here, and the only hook into the
domain is `denoised_fn`, applied to every predicted x0 during sampling (where the text space's clamping
to the nearest word embeddings goes). Modelled on openai/improved-diffusion's `GaussianDiffusion` and
its `respace.py`: any number of sampling steps S <= T is a sampling-time choice, no retraining.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from diffcap.diffusion.schedule import alpha_bar

# model(x_t (B, L, D), t (B,) long, self_cond (B, L, D) or None) -> predicted x0 (B, L, D)
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class SampleResult:
    x0: torch.Tensor  # (B, L, D) the final prediction
    # (t, predicted x0 after denoised_fn) at every step, when asked for
    trajectory: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class GaussianDiffusion:
    def __init__(self, alpha_bars: torch.Tensor) -> None:
        if alpha_bars.ndim != 1 or len(alpha_bars) < 2:
            raise ValueError("alpha_bars must be a 1-D tensor of at least 2 levels")
        if not bool(torch.all(alpha_bars[1:] < alpha_bars[:-1])) or not (0 < float(alpha_bars[-1]) < 1):
            raise ValueError("alpha_bars must decrease strictly and stay within (0, 1)")
        self.alpha_bars = alpha_bars.to(torch.float64)

    @classmethod
    def from_schedule(cls, schedule: str, timesteps: int) -> GaussianDiffusion:
        return cls(alpha_bar(schedule, timesteps))

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

    def training_prediction(
        self,
        model: DenoiseFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        use_self_condition: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, x0_hat) for one training step.

        With `use_self_condition` (the caller draws it with probability p, per batch), a first pass without
        gradient predicts x0, which the second pass receives as its self-conditioning input (Analog Bits).
        """
        x_t = self.q_sample(x0, t, noise)
        self_cond = None
        if use_self_condition:
            with torch.no_grad():
                self_cond = model(x_t, t, None).detach()
        return x_t, model(x_t, t, self_cond)

    # -- reverse process ---------------------------------------------------------------------------------
    def sampling_timesteps(self, steps: int) -> list[int]:
        """S evenly spaced timesteps from T-1 down to 0."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_timesteps}, got {steps}")
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
    ) -> SampleResult:
        """Generate from pure noise with S re-noising steps (DDIM update; eta > 0 adds fresh noise).

        At each step the network predicts x0 from x_t (told a time `time_difference` later than t),
        `denoised_fn` adjusts it, and x_s at the next, smaller timestep s is rebuilt from it.
        """
        if noise is not None:  # the caller's x_T
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            x = noise.to(device=device, dtype=dtype)
        else:  # drawn on the CPU generator: the same noise on any device
            x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        times = self.sampling_timesteps(steps)
        result = SampleResult(x0=x)
        x0_hat: torch.Tensor | None = None
        for i, t in enumerate(times):
            t_model = min(t + time_difference, self.num_timesteps - 1)
            t_batch = torch.full((shape[0],), t_model, dtype=torch.long, device=device)
            x0_hat = model(x, t_batch, x0_hat if self_condition else None)
            if denoised_fn is not None:
                x0_hat = denoised_fn(x0_hat)
            if keep_trajectory:
                result.trajectory.append((t, x0_hat.detach().clone()))
            if i + 1 < len(times):
                x = self.ddim_step(x, x0_hat, t, times[i + 1], eta, generator)
        assert x0_hat is not None
        result.x0 = x0_hat
        return result

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
