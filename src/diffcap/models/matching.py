"""An image–text agreement score for choosing among sampled captions (the seed's "CLIP-supervised" idea, offline).

CLIP is not reachable here, so diffcap trains its own small contrastive matcher on the training captions: the
image side is the encoder's pooled vector, the text side the text backbone's sentence vector
(`text.retrieval.sentence_vectors`, frozen MiniLM by default); each goes through a two-layer MLP into a shared
space, and the two MLPs are trained with CLIP's symmetric InfoNCE loss (a batch of images, one random caption
of each; the other images' captions are the negatives). Fitting takes seconds on pre-computed vectors; the
score is the cosine of the two projections.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class MatcherShape:
    image_dim: int
    text_dim: int
    hidden: int = 1024
    dim: int = 256


class ImageTextMatcher(nn.Module):
    def __init__(self, shape: MatcherShape) -> None:
        super().__init__()
        self.shape = shape
        self.image = nn.Sequential(nn.Linear(shape.image_dim, shape.hidden), nn.GELU(),
                                   nn.Linear(shape.hidden, shape.dim))
        self.text = nn.Sequential(nn.Linear(shape.text_dim, shape.hidden), nn.GELU(),
                                  nn.Linear(shape.hidden, shape.dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def embed_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(pooled.float()), dim=-1)

    def embed_text(self, sentences: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(sentences.float()), dim=-1)

    def similarity(self, pooled: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        """(B,) cosine agreement of image b with sentence b, in [-1, 1]."""
        return (self.embed_image(pooled) * self.embed_text(sentences)).sum(-1)

    def loss(self, pooled: torch.Tensor, sentences: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over a batch of B matching (image, sentence) pairs."""
        logits = self.log_scale.clamp(max=math.log(100)).exp() * self.embed_image(pooled) @ self.embed_text(sentences).T
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def describe(self) -> dict[str, int]:
        return asdict(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores (keys `matcher.*`); the shape is read back from the weights."""
        return {f"matcher.{k}": v.detach().clone() for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ImageTextMatcher | None:
        """The matcher stored among a checkpoint's tensors, None when it holds none."""
        state = {k[len("matcher."):]: v.float() for k, v in tensors.items() if k.startswith("matcher.")}
        if not state:
            return None
        hidden, image_dim = state["image.0.weight"].shape
        shape = MatcherShape(image_dim, state["text.0.weight"].shape[1], hidden, state["image.2.weight"].shape[0])
        matcher = cls(shape)
        matcher.load_state_dict(state)
        return matcher.eval()


def fit_matcher(pooled: torch.Tensor, sentences: torch.Tensor, owners: torch.Tensor, *, epochs: int = 40,
                batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0,
                progress: bool = False, shape: MatcherShape | None = None) -> ImageTextMatcher:
    """Train on M images' pooled vectors (M, Dp) and N captions' sentence vectors (N, Dt), caption n of image
    owners[n]. An epoch visits every image once, each with one of its captions drawn at random."""
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"fit_matcher needs epochs >= 1 and batch_size >= 2, not {epochs} and {batch_size}")
    if len(sentences) != len(owners) or len(pooled) < 2:
        raise ValueError("the matcher needs one owner per caption and at least two images")
    if owners.min() < 0 or owners.max() >= len(pooled):
        raise ValueError("caption owners must index the images")
    counts = torch.bincount(owners, minlength=len(pooled))
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} images have no caption")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    matcher = ImageTextMatcher(shape or MatcherShape(pooled.shape[1], sentences.shape[1]))
    order = torch.argsort(owners, stable=True)  # captions grouped by image
    first = torch.cumsum(counts, 0) - counts
    steps = epochs * math.ceil(len(pooled) / batch_size)
    optimiser = torch.optim.AdamW(matcher.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    pooled, sentences = pooled.float(), sentences.float()
    matcher.train()
    bar = tqdm(total=steps, desc="fitting the matcher", unit="step", disable=not progress, leave=False)
    for _ in range(epochs):
        images = torch.randperm(len(pooled), generator=g)
        for start in range(0, len(images), batch_size):
            rows = images[start: start + batch_size]
            if len(rows) < 2:
                continue
            pick = first[rows] + (torch.rand(len(rows), generator=g) * counts[rows]).long()
            loss = matcher.loss(pooled[rows], sentences[order[pick]])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return matcher.eval()


@torch.no_grad()
def retrieval_recall(matcher: ImageTextMatcher, pooled: torch.Tensor, sentences: torch.Tensor,
                     owners: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """(text→image R@k, image→text R@k): the share of captions whose own image is among the k images most
    similar to it, and of images with one of their own captions among the k most similar captions."""
    sims = matcher.embed_text(sentences) @ matcher.embed_image(pooled).T  # (N, M)
    k_images = min(k, sims.shape[1])
    text_to_image = (sims.topk(k_images, dim=1).indices == owners[:, None]).any(1).float().mean().item()
    top_captions = sims.T.topk(min(k, sims.shape[0]), dim=1).indices  # (M, k)
    image_to_text = (owners[top_captions] == torch.arange(len(pooled))[:, None]).any(1).float().mean().item()
    return text_to_image, image_to_text
