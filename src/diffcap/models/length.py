"""How long a caption should be, from the image alone (`sample.length="predicted"`).

A diffusion captioner decides every position at once, [SEP] and [PAD] included. An uncertain position drifts
to the centre of the latent space, where [PAD] lies, so captions end early (7 words against the references'
11; BENCHMARKS.md). Non-autoregressive captioners fix the length first and generate the words to fill it
(LaDiC's length predictor; the length prediction of non-autoregressive translation). Here the predictor is a
multinomial logistic regression from the pooled image vector to the number of word pieces before [SEP],
fitted once on the training images (seconds, before the denoiser trains) and saved in the checkpoint; the
sampler then fixes [SEP] at that position and [PAD] after it (`TextSpace.round(lengths=...)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LengthPredictor:
    """Caption length (word pieces before [SEP], 1 .. max_length - 1) from the pooled image vector."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        if weight.ndim != 2 or weight.shape[1] != mean.shape[0] or bias.shape != weight.shape[:1]:
            raise ValueError(f"length predictor tensors do not fit: weight {tuple(weight.shape)}, "
                             f"bias {tuple(bias.shape)}, mean {tuple(mean.shape)}")
        self.mean, self.std, self.weight, self.bias = mean.float(), std.float(), weight.float(), bias.float()

    @property
    def max_length(self) -> int:
        """The caption length in positions: classes are 0 .. max_length - 1 word pieces."""
        return self.weight.shape[0]

    @classmethod
    def fit(cls, pooled: torch.Tensor, lengths: torch.Tensor, owners: torch.Tensor, max_length: int, *,
            weight_decay: float = 0.3, iterations: int = 100) -> LengthPredictor:
        """Fit on M images' pooled vectors (M, Dp) and N captions' lengths (N,), caption n of image owners[n].

        Each image's target is the distribution of its captions' lengths (five references rarely agree), so the
        model learns P(length | image); L-BFGS on the full batch with an L2 penalty (deterministic, seconds).
        The penalty is strong on purpose: on Flickr8k a caption's length is barely predictable from the image
        (correlation 0.16 with the median reference length on dev), and weaker penalties over-fit 6,000 images
        (dev MAE 2.5-3.1 word pieces at 1e-3..1e-2 against 2.1 at 0.3)."""
        if len(lengths) != len(owners) or len(lengths) == 0:
            raise ValueError("the length predictor needs one owner image per caption length, and some captions")
        x = pooled.float()
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
        x = (x - mean) / std
        target = torch.zeros(len(x), max_length)
        target.index_put_((owners, lengths.clamp(0, max_length - 1)), torch.ones(len(lengths)), accumulate=True)
        seen = target.sum(1) > 0
        x, target = x[seen], target[seen] / target[seen].sum(1, keepdim=True)
        weight = torch.zeros(max_length, x.shape[1], requires_grad=True)
        # the bias starts at the log of the overall length distribution: the image-free answer
        bias = target.mean(0).clamp(min=1e-6).log().requires_grad_(True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight.T + bias, target) + weight_decay * weight.square().sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        return cls(mean, std, weight.detach(), bias.detach())

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, max_length) log-probabilities of each length; lengths 0 (an empty caption) never win."""
        x = (pooled.float() - self.mean.to(pooled.device)) / self.std.to(pooled.device)
        logits = x @ self.weight.to(pooled.device).T + self.bias.to(pooled.device)
        logits[:, 0] = -float("inf")
        return logits.log_softmax(-1)

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B,) the most likely length of each image's caption (1 .. max_length - 1)."""
        return self.logits(pooled).argmax(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"length.mean": self.mean, "length.std": self.std, "length.weight": self.weight,
                "length.bias": self.bias}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> LengthPredictor | None:
        if "length.weight" not in tensors:
            return None
        return cls(tensors["length.mean"], tensors["length.std"], tensors["length.weight"], tensors["length.bias"])


def caption_lengths(ids: torch.Tensor, sep_index: int) -> torch.Tensor:
    """(N,) word pieces before [SEP] of encoded captions (N, L) (`TextSpace.encode` always writes one [SEP])."""
    return (ids == sep_index).int().argmax(-1)
