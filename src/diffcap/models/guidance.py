"""Classifier-free guidance as a wrapper: turns a conditional denoiser into the sampler's DenoiseFn."""

from __future__ import annotations

import torch

from diffcap.diffusion.gaussian import DenoiseFn
from diffcap.models.denoiser import Condition, Denoiser, ImageFeatures


def conditioned(denoiser: Denoiser, image: ImageFeatures | None, guidance: float = 0.0) -> DenoiseFn:
    """x0_hat = (1 + w) * f(x_t | image) - w * f(x_t | no image); w = 0 is plain conditioning.

    With w > 0 the conditional and unconditional halves run as one batch of 2B (as DiT's forward_with_cfg).
    `image=None` generates unconditionally (the network's learned "no image" prefix). What depends on the image
    only (`Denoiser.condition`: prefix positions, cross-attention keys and values) is computed at the first
    call and reused at every later step.
    """
    cache: dict[int, Condition] = {}

    def plain(x_t: torch.Tensor, t: torch.Tensor, self_cond: torch.Tensor | None) -> torch.Tensor:
        B = x_t.shape[0]
        if B not in cache:
            cache[B] = denoiser.condition(image, None, B)
        return denoiser(x_t, t, self_cond=self_cond, cond=cache[B])

    if guidance == 0.0 or image is None:
        return plain

    def guided(x_t: torch.Tensor, t: torch.Tensor, self_cond: torch.Tensor | None) -> torch.Tensor:
        B = x_t.shape[0]
        if B not in cache:
            keep = torch.cat([torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)]).to(x_t.device)
            cache[B] = denoiser.condition(image.repeat(2), keep, 2 * B)
        sc = None if self_cond is None else torch.cat([self_cond, self_cond])
        out = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), self_cond=sc, cond=cache[B])
        cond, uncond = out.chunk(2)
        return cond + guidance * (cond - uncond)

    return guided
