"""The contrastive image–text matcher (models/matching.py) on synthetic vectors with a known pairing."""

from __future__ import annotations

import pytest
import torch

from diffcap.models.matching import ImageTextMatcher, MatcherShape, fit_matcher, retrieval_recall


def paired_data(images: int, captions_per_image: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images and captions that share a hidden 8-dimensional topic through different random linear maps."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(images, 8, generator=g)
    to_image = torch.randn(8, 32, generator=torch.Generator().manual_seed(100))
    to_text = torch.randn(8, 24, generator=torch.Generator().manual_seed(101))
    pooled = topics @ to_image + 0.1 * torch.randn(images, 32, generator=g)
    owners = torch.arange(images).repeat_interleave(captions_per_image)
    sentences = topics[owners] @ to_text + 0.3 * torch.randn(len(owners), 24, generator=g)
    return pooled, sentences, owners


def test_the_matcher_learns_which_caption_belongs_to_which_image() -> None:
    pooled, sentences, owners = paired_data(200, 3, seed=0)
    matcher = fit_matcher(pooled, sentences, owners, epochs=60, batch_size=64)
    test_pooled, test_sentences, test_owners = paired_data(100, 2, seed=1)  # unseen images, the same maps
    t2i, i2t = retrieval_recall(matcher, test_pooled, test_sentences, test_owners, k=5)
    assert t2i > 0.6 and i2t > 0.8  # chance: 5 % and about 10 %
    own = matcher.similarity(test_pooled[test_owners], test_sentences)
    other = matcher.similarity(test_pooled[test_owners.roll(7)], test_sentences)
    assert (own > other).float().mean() > 0.9


def test_an_untrained_matcher_is_at_chance() -> None:
    pooled, sentences, owners = paired_data(100, 2, seed=1)
    torch.manual_seed(0)
    matcher = ImageTextMatcher(MatcherShape(32, 24)).eval()
    t2i, _ = retrieval_recall(matcher, pooled, sentences, owners, k=5)
    assert t2i < 0.25


def test_fit_matcher_rejects_captions_without_images() -> None:
    pooled, sentences, owners = paired_data(10, 2, seed=0)
    with pytest.raises(ValueError, match="owner"):
        fit_matcher(pooled, sentences[:-1], owners)
    with pytest.raises(ValueError, match="index the images"):
        fit_matcher(pooled, sentences, owners + 5)
    with pytest.raises(ValueError, match="no caption"):
        fit_matcher(pooled, sentences[:10], owners[:10])
    with pytest.raises(ValueError, match="epochs"):
        fit_matcher(pooled, sentences, owners, epochs=0)
