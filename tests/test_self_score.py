"""Choosing among samples by the diffusion model's own denoising loss (sample.self_weight,
`denoising_cross_entropy`): fixed noise per image, the same score whatever the batch, and the choice it makes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffcap.models.denoiser import ImageFeatures
from diffcap.pipeline import (CaptionModel, choose_candidates, denoising_cross_entropy, generate, load_model,
                              matcher_scores)


@pytest.fixture(scope="module")
def matched(matched_checkpoint: Path) -> CaptionModel:
    return load_model(matched_checkpoint)[0]


def features(model: CaptionModel, n: int, seed: int = 0) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    shape = model.denoiser.shape
    return ImageFeatures(torch.randn(n, shape.pooled_dim, generator=g), torch.randn(n, 4, shape.grid_dim, generator=g))


def pick(image: ImageFeatures, rows: list[int]) -> ImageFeatures:
    return ImageFeatures(image.pooled[rows], image.grid[rows])


def test_the_score_of_a_caption_depends_on_its_image_and_row_not_on_its_batch(matched: CaptionModel) -> None:
    image = features(matched, 3)
    captions = ["a red circle", "a blue square on the left", "two green triangles"]
    together = denoising_cross_entropy(matched, image, captions, rows=[0, 1, 2])
    assert together.shape == (3,) and torch.isfinite(together).all() and (together > 0).all()
    for i in range(3):  # alone, or at another position of another batch: the same score
        alone = denoising_cross_entropy(matched, pick(image, [i]), captions[i: i + 1], rows=[i])
        assert torch.allclose(alone, together[i: i + 1], atol=1e-5)
    swapped = denoising_cross_entropy(matched, pick(image, [2, 0]), [captions[2], captions[0]], rows=[2, 0])
    assert torch.allclose(swapped, together[[2, 0]], atol=1e-5)
    # the noise is the row's: another row (or seed) draws other noise, so another score
    assert not torch.allclose(denoising_cross_entropy(matched, pick(image, [0]), captions[:1], rows=[7]), together[:1])
    assert not torch.allclose(denoising_cross_entropy(matched, pick(image, [0]), captions[:1], rows=[0], seed=1), together[:1])
    # and the image matters: the same caption and noise under another image scores differently
    assert not torch.allclose(denoising_cross_entropy(matched, pick(image, [1]), captions[:1], rows=[0]), together[:1])


def test_an_empty_caption_is_never_preferred_and_mismatched_inputs_are_refused(matched: CaptionModel) -> None:
    image = features(matched, 2)
    scores = denoising_cross_entropy(matched, image, ["", "a red circle"], rows=[0, 1])
    assert scores[0] == float("inf") and torch.isfinite(scores[1])
    with pytest.raises(ValueError, match="one each"):
        denoising_cross_entropy(matched, image, ["a red circle"], rows=[0, 1])


def test_self_weight_subtracts_the_models_own_loss_from_the_matchers_choice(matched: CaptionModel) -> None:
    image, n = features(matched, 8), 4
    plain = generate(matched, image, steps=2, candidates=n, select="match")
    for w in (0.5, 1e4):
        out = generate(matched, image, steps=2, candidates=n, select="match", self_weight=w)
        assert out.candidates == plain.candidates  # the same samples, another choice rule
        for i, row in enumerate(out.candidates):
            rows = pick(image, [i] * n)
            own = denoising_cross_entropy(matched, rows, row, rows=[i] * n)
            score = matcher_scores(matched, rows, row) - w * own
            assert out.captions[i] == row[int(score.argmax())]
            if w == 1e4:  # a weight that drowns the matcher: the candidate the model reconstructs best
                assert out.captions[i] == row[int(own.argmin())]
    # ... which is not always the matcher's
    assert out.captions != plain.captions
    # the rows of a batch are images 0..B-1 unless indices say otherwise: image 1 alone as index 1 chooses alike
    alone = generate(matched, pick(image, [1]), steps=2, candidates=n, select="match", self_weight=0.5, indices=[1])
    assert alone.captions[0] == generate(matched, image, steps=2, candidates=n, select="match",
                                         self_weight=0.5).captions[1]


def test_self_weight_counts_where_the_matcher_does_and_is_checked(matched: CaptionModel, matched_checkpoint: Path,
                                                                    shapes_jsonl: Path, capsys) -> None:
    from diffcap.cli import main
    from diffcap.config import ConfigError, load_config

    image = features(matched, 2)
    mbr = generate(matched, image, steps=2, candidates=3, select="mbr")
    assert generate(matched, image, steps=2, candidates=3, select="mbr", self_weight=1e4).captions == mbr.captions
    with pytest.raises(ValueError, match="self_weight must be >= 0"):
        generate(matched, image, steps=2, candidates=2, select="match", self_weight=-1.0)
    config = load_config("default", ["sample.select=match", "sample.self_weight=0.35"])
    assert config.sample.self_weight == 0.35
    with pytest.raises(ConfigError, match="self_weight"):
        load_config("default", ["sample.self_weight=0.35"])  # the default select=mbr does not use the matcher
    with pytest.raises(ConfigError, match="self_weight"):
        load_config("default", ["sample.select=match", "sample.self_weight=-1"])
    # on the command line, a --self-weight that would change nothing is refused with a clear line
    photo = str(sorted((shapes_jsonl.parent / "images").glob("dev_*.png"))[0])
    ckpt = str(matched_checkpoint)
    assert main(["caption", ckpt, photo, "--steps", "2", "--candidates", "2", "--select", "mbr",
                 "--self-weight", "1"]) == 2
    err = capsys.readouterr().err
    assert "--self-weight refines the image-text matcher's score" in err and "Traceback" not in err
    assert main(["caption", ckpt, photo, "--steps", "2", "--candidates", "2", "--select", "match",
                 "--self-weight", "1"]) == 0


def test_sampling_and_choosing_build_no_autograd_graph(matched: CaptionModel, monkeypatch) -> None:
    """generate and choose_candidates run the denoiser without gradients (a graph per step would cost memory
    and time), whatever the caller's grad mode."""
    modes: list[bool] = []
    forward = matched.denoiser.forward
    monkeypatch.setattr(matched.denoiser, "forward",
                        lambda *args, **kwargs: modes.append(torch.is_grad_enabled()) or forward(*args, **kwargs))
    with torch.enable_grad():
        generate(matched, features(matched, 2), steps=2, candidates=2, select="match", self_weight=0.5)
        choose_candidates(matched, features(matched, 1), [["a red circle", "a blue square"]], rows=[0], seed=0,
                          select="match", self_weight=0.5)  # as Captioner.samples calls it, outside generate
    assert len(modes) > 2 * 2 and not any(modes)


def test_choose_candidates_checks_its_settings(matched: CaptionModel) -> None:
    """Captioner.samples chooses through choose_candidates directly: bad settings are refused there too."""
    image, rows = features(matched, 1), [["a red circle", "a blue square"]]
    for settings, message in [(dict(select="best"), "select must be"), (dict(self_weight=-1.0), "self_weight must"),
                              (dict(match_weight=-1.0), "match_weight must")]:
        with pytest.raises(ValueError, match=message):
            choose_candidates(matched, image, rows, rows=[0], seed=0, **settings)
    assert choose_candidates(matched, image, rows, rows=[0], seed=0, select="mbr") == [0]  # a tie: the first
