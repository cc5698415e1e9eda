"""Training losses for caption latents: x0 distance + rounding cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffcap.config import LossConfig
from diffcap.text.space import TextSpace


def caption_losses(
    x0_hat: torch.Tensor,  # (B, L, D) predicted clean latents
    x0: torch.Tensor,  # (B, L, D) true latents
    ids: torch.Tensor,  # (B, L) true token indices
    space: TextSpace,
    config: LossConfig,
) -> dict[str, torch.Tensor]:
    """Every loss term (scalars) and their weighted sum under "loss".

    - x0_mse: mean squared error in standardised units (divided by latent_scale^2), so its size does not
      depend on the latent scale.
    - rounding: cross-entropy of the tokens against the tied rounding logits of the prediction — it keeps
      the prediction decodable (Diffusion-LM's decoder NLL, the seed's "prob" loss).
    """
    x0_hat = x0_hat.float()
    mse = ((x0_hat - x0) ** 2).mean() / space.latent_scale**2
    logits = space.logits(x0_hat)  # (B, L, V)
    rounding = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    total = mse + config.rounding_weight * rounding
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == ids).float().mean()
    return {"loss": total, "x0_mse": mse, "rounding": rounding, "token_accuracy": accuracy}


def decoder_losses(logits: torch.Tensor, ids: torch.Tensor, space: TextSpace) -> dict[str, torch.Tensor]:
    """Next-word cross-entropy of the autoregressive baseline, over each caption's pieces and its [SEP]
    (the [PAD] positions after it are not predicted)."""
    target = ids.masked_fill(ids == space.pad_index, -100)  # (B, L)
    loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100)
    with torch.no_grad():
        mask = target >= 0
        accuracy = ((logits.argmax(-1) == ids) & mask).sum() / mask.sum().clamp(min=1)
    return {"loss": loss, "cross_entropy": loss.detach(), "token_accuracy": accuracy}
