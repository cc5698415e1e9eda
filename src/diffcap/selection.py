"""Choosing one caption among several sampled for the same image.

Minimum Bayes risk (DiffuSeq's MBR decoding): the chosen caption is the one that agrees most with the other
samples — an estimate of the caption with the highest expected similarity to the unknown reference. Pure
Python on word lists; similarity is the mean over n = 1..4 (at most the shorter length) of the n-gram F1 with clipped counts (a symmetric,
smoothed sentence-BLEU-like score).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))


def similarity(a: Sequence[str], b: Sequence[str], max_n: int = 4) -> float:
    """Mean over n = 1..N of the F1 of shared n-grams, N = min(max_n, both lengths); 0 when either is empty."""
    top = min(max_n, len(a), len(b))
    if top == 0:
        return 0.0
    total = 0.0
    for n in range(1, top + 1):
        ca, cb = _ngrams(a, n), _ngrams(b, n)
        overlap = sum((ca & cb).values())
        if overlap:
            total += 2 * overlap / (sum(ca.values()) + sum(cb.values()))
    return total / top


def mbr_scores(candidates: Sequence[str]) -> list[float]:
    """Each candidate's mean similarity to the others (in [0, 1]; 0 for a single candidate)."""
    words = [c.split() for c in candidates]
    others = max(len(words) - 1, 1)
    return [sum(similarity(w, other) for j, other in enumerate(words) if j != i) / others for i, w in enumerate(words)]


def mbr_select(candidates: Sequence[str]) -> int:
    """Index of the candidate with the largest mean similarity to the others (the first on ties)."""
    if not candidates:
        raise ValueError("mbr_select needs at least one candidate")
    scores = mbr_scores(candidates)
    return max(range(len(candidates)), key=lambda i: (scores[i], -i))
