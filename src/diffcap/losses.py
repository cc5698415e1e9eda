"""Training losses: the distance of the network's output to its target, at x_t and/or x_1, plus the rounding
cross-entropy of the tokens from the x0 estimate; or the autoregressive baseline's next-word cross-entropy."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from diffcap.config import LossConfig
from diffcap.diffusion.gaussian import TrainingPrediction
from diffcap.text.space import TextSpace


def reduce(per_position: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L) per-position losses -> scalar: "mean", "series_sum" (all summed), "series_sum_sample_mean"."""
    if how == "mean":
        return per_position.mean()
    if how == "series_sum":
        return per_position.sum()
    if how == "series_sum_sample_mean":
        return per_position.sum(-1).mean()
    raise ValueError(f"unknown loss reduction {how!r}")


def distance(output: torch.Tensor, target: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """(B, L) per-position distance averaged over the latent dimension, in units of `scale`."""
    diff = (output.float() - target.float()) / scale
    if kind == "mse":
        return (diff**2).mean(-1)
    if kind == "l1":
        return diff.abs().mean(-1)
    raise ValueError(f"unknown distance {kind!r}")


def caption_losses(
    pred: TrainingPrediction,
    ids: torch.Tensor,  # (B, L) true token indices
    space: TextSpace,
    config: LossConfig,
    *,
    pred_1: TrainingPrediction | None = None,  # the pass from x_1, when a term needs it
    latent_target: bool = True,  # False when the network predicts the noise (unit scale, not latents)
    rounding_weight: float | None = None,  # overrides config.rounding_weight (the dynamic weight)
    table: torch.Tensor | None = None,  # the learned word table (text.embeddings != "frozen")
) -> dict[str, torch.Tensor]:
    """Every loss term (scalars) and their weighted sum under "loss".

    - x_t / x_1: distance of the network's output to its target, from x_t at the batch's t / from x_1
      (in standardised units, so its size does not depend on text.latent_scale);
    - rounding: cross-entropy of the tokens against the tied rounding logits of the x0 estimate — it keeps
      the prediction decodable (Diffusion-LM's decoder NLL, the seed's "prob" loss).
    """
    scale = space.latent_scale if latent_target else 1.0
    weight = config.rounding_weight if rounding_weight is None else rounding_weight
    terms: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=ids.device)
    terms["x_t"] = reduce(distance(pred.output, pred.target, config.distance, scale), config.reduction)
    total = total + config.x_t_weight * terms["x_t"]
    if pred_1 is not None:
        terms["x_1"] = reduce(distance(pred_1.output, pred_1.target, config.distance, scale), config.reduction)
        total = total + config.x_1_weight * terms["x_1"]
    sources = {"x_t": [pred], "x_1": [pred_1], "both": [pred, pred_1]}[config.rounding_on]
    if any(p is None for p in sources):
        raise ValueError(f"loss.rounding_on={config.rounding_on!r} needs the x_1 pass")
    # the rounding head in the training precision (bf16 under autocast: a third of a step's FLOPs) or fp32;
    # the softmax and cross-entropy in fp32 either way
    head = contextlib.nullcontext() if config.rounding_precision == "train" \
        else torch.autocast(device_type=ids.device.type, enabled=False)
    rounding = torch.zeros((), device=ids.device)
    first_logits: torch.Tensor | None = None  # those of `pred`, reused for the accuracy
    for p in sources:
        assert p is not None
        with head:
            logits = space.logits(p.x0_hat if config.rounding_precision == "train" else p.x0_hat.float(), table)
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
        rounding = rounding + reduce(ce, config.reduction)
        if p is pred:
            first_logits = logits
    terms["rounding"] = rounding
    total = total + weight * rounding
    with torch.no_grad():
        if first_logits is None:
            with head:
                first_logits = space.logits(pred.x0_hat.detach(), table)
        accuracy = (first_logits.argmax(-1) == ids).float().mean()
    return {"loss": total, **terms, "token_accuracy": accuracy}


def decoder_losses(logits: torch.Tensor, ids: torch.Tensor, space: TextSpace,
                   label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Next-word cross-entropy of the autoregressive baseline, over each caption's pieces and its [SEP]
    (the [PAD] positions after it are not predicted); `label_smoothing` spreads that much of each target's
    probability over the vocabulary ("cross_entropy" is logged without it)."""
    target = ids.masked_fill(ids == space.pad_index, -100).flatten()  # (B * L,)
    flat = logits.float().flatten(0, 1)
    loss = F.cross_entropy(flat, target, ignore_index=-100, label_smoothing=label_smoothing)
    with torch.no_grad():
        plain = F.cross_entropy(flat, target, ignore_index=-100) if label_smoothing > 0 else loss.detach()
        mask = target >= 0
        accuracy = ((flat.argmax(-1) == ids.flatten()) & mask).sum() / mask.sum().clamp(min=1)
    return {"loss": loss, "cross_entropy": plain, "token_accuracy": accuracy}


def self_critical_loss(logits: torch.Tensor, tokens: torch.Tensor, rewards: torch.Tensor, samples: int,
                       end: tuple[int, ...], temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """REINFORCE with the other samples' mean reward as baseline (self-critical training, Rennie et al. 2017,
    with Luo's 2020 multi-sample baseline), on `samples` captions drawn per image.

    `tokens` (K*B, L) are the sampled word pieces, sample k of image b in row k*B + b; `logits` (K*B, L, V) the
    network's teacher-forced outputs on them; `rewards` (K*B,) their scores. Each word piece up to and
    including the first `end` index counts; the loss is the advantage-weighted negative log-likelihood per
    counted piece, under softmax(logits / `temperature`): the distribution the samples were drawn from."""
    if samples < 2:
        raise ValueError("a self-critical baseline needs at least 2 samples per image")
    by_image = rewards.view(samples, -1)  # (K, B)
    baseline = (by_image.sum(0, keepdim=True) - by_image) / (samples - 1)  # mean of the *other* samples
    advantage = (by_image - baseline).flatten()  # (K*B,)
    is_end = torch.isin(tokens, torch.tensor(end, device=tokens.device))
    counted = ((is_end.long().cumsum(1) - is_end.long()) == 0).float()  # through the first end
    logp = (logits.float() / temperature).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (K*B, L)
    loss = -(advantage.unsqueeze(1) * logp * counted).sum() / counted.sum().clamp(min=1)
    return {"loss": loss, "reward": rewards.mean(), "advantage_spread": advantage.abs().mean(),
            "caption_pieces": counted.sum(1).mean()}


class DynamicRoundingWeight:
    """The original's "dynamic" rounding weight (DYNAMIC_ROUNDING_WEIGHT): at every step,
    C x (running sum of the weighted distance terms) / (running sum of the rounding term) over the epoch so far,
    so the rounding term keeps a fixed share C of the distance; the constant weight until the epoch has data.
    """

    def __init__(self, c: float, initial: float) -> None:
        self.c, self.initial = c, initial
        self.distance = self.rounding = 0.0

    def reset(self) -> None:  # at the start of every epoch
        self.distance = self.rounding = 0.0

    def value(self) -> float:
        return self.initial if self.rounding <= 0 else self.c * self.distance / self.rounding

    def update(self, losses: dict[str, torch.Tensor], config: LossConfig) -> None:
        value = lambda name: float(losses[name].detach()) if name in losses else 0.0  # noqa: E731
        self.distance += config.x_t_weight * value("x_t") + config.x_1_weight * value("x_1")
        self.rounding += value("rounding")

    def state(self) -> dict[str, float]:
        return {"distance": self.distance, "rounding": self.rounding}

    def load(self, state: dict[str, float]) -> None:
        self.distance, self.rounding = float(state["distance"]), float(state["rounding"])
