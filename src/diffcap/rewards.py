"""CIDEr-D of single captions against one training image's references: the reward of self-critical training.

`diffcap evaluate` scores a whole split with pycocoevalcap, whose document frequencies come from the split
being scored. A training reward needs the score of one sampled caption at a time, many thousand times, with
the document frequencies of the *training* references (as in Rennie et al., "Self-critical sequence training",
2017, and the CIDEr-D of its public code). This module precomputes those frequencies and every reference's
tf-idf vectors once; its formula is pycocoevalcap's CiderScorer (clipped n-gram tf-idf cosine, a Gaussian
length penalty, sigma 6, times 10), which `tests/test_rewards.py` checks score for score. Text is tokenised with
`metrics.simple_ptb_tokenize` (PTB's rules in Python; no Java process per batch).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from pycocoevalcap.cider.cider_scorer import precook

from diffcap.metrics import simple_ptb_tokenize

Vector = tuple[list[dict[tuple[str, ...], float]], list[float], int]  # per-order tf-idf, per-order norm, length


class CiderD:
    """CIDEr-D of a caption against the references of image `i`, with document frequencies over all images'
    reference sets (one document per image)."""

    def __init__(self, references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        if not references or any(not refs for refs in references):
            raise ValueError("CIDEr-D needs at least one reference caption for every image")
        self.n, self.sigma = n, sigma
        counts = [[precook(simple_ptb_tokenize(c), n) for c in refs] for refs in references]
        self.document_frequency: Counter[tuple[str, ...]] = Counter()
        for refs in counts:
            self.document_frequency.update({gram for ref in refs for gram in ref})
        self.log_documents = math.log(float(len(references)))
        self.references = [[self._vector(ref) for ref in refs] for refs in counts]

    def __len__(self) -> int:
        return len(self.references)

    def _vector(self, counts: dict[tuple[str, ...], int]) -> Vector:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            # an n-gram no reference set has counts as if one had it (pycocoevalcap's max(1, df))
            weight = float(tf) * (self.log_documents - math.log(max(1.0, self.document_frequency[gram])))
            vec[k][gram] = weight
            norm[k] += weight * weight
            if k == 1:  # pycocoevalcap measures length in bigrams (its "n == 1"): kept for identical scores
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, caption: str, image: int) -> float:
        """CIDEr-D (x10, as pycocoevalcap reports it before the x100 of our tables) of `caption` for image
        `image` (its index in the references given at construction)."""
        vec, norm, length = self._vector(precook(simple_ptb_tokenize(caption), self.n))
        refs = self.references[image]
        total = 0.0
        for ref_vec, ref_norm, ref_length in refs:
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                ref_k = ref_vec[k]
                value = sum(min(w, ref_k.get(g, 0.0)) * ref_k.get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and ref_norm[k] != 0:
                    value /= norm[k] * ref_norm[k]
                total += value * penalty
        return total / self.n / len(refs) * 10.0

    def scores(self, captions: Sequence[str], images: Sequence[int]) -> list[float]:
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images")
        return [self.score(c, i) for c, i in zip(captions, images)]
