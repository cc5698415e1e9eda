"""The text slot's feature: the captions of the nearest training image (`model.text_slot="retrieved"`).

The original research had a second conditioning slot for a text feature next to the image's. On Flickr8k it
held the embedding of the very caption to be generated, which made its scores caption-from-caption
(SEED.md). A text feature is only valid if it exists at test time, so diffcap's slot holds a *retrieved* one,
as retrieval-augmented captioners do (SmallCap): the mean sentence embedding of the captions of the training
image whose pooled feature is most similar (cosine) to this image's. In training an image never retrieves
itself, so the model learns to use a neighbour's captions, exactly what it gets on new images.

Sentence embeddings are the text backbone's mean-pooled last layer, L2-normalised (the sentence-transformers
recipe; the offline MiniLM default is all-MiniLM-L6-v2). The memory (training images' normalised pooled
features and their caption vectors, fp16) is saved inside the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffcap.text.space import load_backbone


@torch.no_grad()
def sentence_vectors(backbone: str, sentences: Sequence[str], *, batch_size: int = 256,
                     progress: bool = False) -> torch.Tensor:
    """(N, H) L2-normalised mean-pooled last-layer states of the backbone, one per sentence."""
    tokenizer, model = load_backbone(backbone)
    out = []
    for start in tqdm(range(0, len(sentences), batch_size), desc="sentence vectors", unit="batch",
                      disable=not progress, leave=False):
        enc = tokenizer(list(sentences[start: start + batch_size]), padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        states = model(**enc).last_hidden_state  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
        out.append(F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)


@dataclass
class RetrievalMemory:
    keys: torch.Tensor  # (M, Dp) L2-normalised pooled image features of the training images, fp16
    values: torch.Tensor  # (M, Dt) L2-normalised mean sentence vector of each image's captions, fp16

    @classmethod
    def build(cls, backbone: str, pooled: torch.Tensor, captions: Sequence[Sequence[str]], *,
              progress: bool = False) -> RetrievalMemory:
        """From the training images' pooled features (M, Dp) and their captions (M lists)."""
        if len(pooled) != len(captions) or any(not c for c in captions):
            raise ValueError("the retrieval memory needs one pooled feature and at least one caption per image")
        flat = [c for cs in captions for c in cs]
        vectors = sentence_vectors(backbone, flat, progress=progress)
        owner = torch.tensor([i for i, cs in enumerate(captions) for _ in cs])
        sums = torch.zeros(len(captions), vectors.shape[1]).index_add_(0, owner, vectors)
        return cls(F.normalize(pooled.float(), dim=-1).half(), F.normalize(sums, dim=-1).half())

    def nearest(self, pooled: torch.Tensor, exclude: torch.Tensor | None = None, *, chunk: int = 1024) -> torch.Tensor:
        """(B, Dt) the caption vector of each query's most similar memory image; `exclude` (B,) memory rows a
        query may not retrieve (its own, in training)."""
        keys = self.keys.to(pooled.device, torch.float32)
        out = []
        for start in range(0, len(pooled), chunk):
            sims = F.normalize(pooled[start: start + chunk].float(), dim=-1) @ keys.T  # (b, M)
            if exclude is not None:
                rows = torch.arange(len(sims), device=sims.device)
                sims[rows, exclude[start: start + chunk].to(sims.device)] = -float("inf")
            out.append(self.values.to(pooled.device, torch.float32)[sims.argmax(-1)])
        return torch.cat(out)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"retrieval.keys": self.keys, "retrieval.values": self.values}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RetrievalMemory | None:
        if "retrieval.keys" not in tensors:
            return None
        return cls(tensors["retrieval.keys"], tensors["retrieval.values"])
