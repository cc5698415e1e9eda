"""Choosing among diffusion samples by an autoregressive model's likelihood (`evaluate --rerank`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffcap.losses import decoder_losses
from diffcap.models.denoiser import ImageFeatures
from diffcap.pipeline import caption_log_likelihood, generate, load_model


@pytest.fixture(scope="module")
def ar_checkpoint(shapes_jsonl: Path, tiny_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffcap.train import train

    config = tiny_config(shapes_jsonl, model__kind="autoregressive", train__ema_decay=0.0)
    return train(config, tmp_path_factory.mktemp("ar-run") / "run", progress=False)


def _images(model, n: int, seed: int = 0) -> ImageFeatures:
    shape = model.denoiser.shape
    g = torch.Generator().manual_seed(seed)
    return ImageFeatures(torch.randn(n, shape.pooled_dim, generator=g), torch.randn(n, 4, shape.grid_dim, generator=g))


def test_log_likelihood_is_the_next_word_loss(ar_checkpoint: Path) -> None:
    ar, _ = load_model(ar_checkpoint)
    image = _images(ar, 2)
    captions = ["a red circle", "a blue square on the left"]
    scores = caption_log_likelihood(ar, image, captions)
    for i, caption in enumerate(captions):  # one caption at a time: the mean log-probability is minus the loss
        ids = ar.space.encode([caption])
        ce = decoder_losses(ar.denoiser(ids, _row(image, i)), ids, ar.space)["cross_entropy"]
        assert scores[i].item() == pytest.approx(-ce.item(), abs=1e-4)
    assert caption_log_likelihood(ar, image, ["", "a red circle"])[0] == -float("inf")
    with pytest.raises(ValueError, match="2 images"):
        caption_log_likelihood(ar, image, ["a red circle"])


def _row(image: ImageFeatures, i: int) -> ImageFeatures:
    return ImageFeatures(image.pooled[i: i + 1], image.grid[i: i + 1])


def test_rerank_keeps_the_most_likely_candidate(tiny_checkpoint: Path, ar_checkpoint: Path) -> None:
    model, _ = load_model(tiny_checkpoint)
    ar, _ = load_model(ar_checkpoint)
    image = _images(model, 3, seed=1)
    out = generate(model, image, steps=3, candidates=4, reranker=ar)
    assert len(out.candidates) == 3 and all(len(row) == 4 for row in out.candidates)
    for i, row in enumerate(out.candidates):
        scores = caption_log_likelihood(ar, ImageFeatures(image.pooled[i: i + 1].repeat(4, 1),
                                                          image.grid[i: i + 1].repeat(4, 1, 1)), row)
        assert out.captions[i] == row[int(scores.argmax())]
    # the candidates are those of plain sampling: only the choice differs
    assert generate(model, image, steps=3, candidates=4).candidates == out.candidates
    with pytest.raises(ValueError, match="autoregressive"):
        caption_log_likelihood(model, image, ["a", "b", "c"])


def test_evaluate_rerank_flag(tiny_checkpoint: Path, ar_checkpoint: Path, shapes_jsonl: Path, tmp_path: Path,
                              capsys) -> None:
    from diffcap.cli import main

    common = [str(tiny_checkpoint), "--dataset", "jsonl", "--root", str(shapes_jsonl), "--split", "dev",
              "--steps", "2", "--allow-training-images"]
    out = tmp_path / "dev.json"
    assert main(["evaluate", *common, "--candidates", "2", "--rerank", str(ar_checkpoint), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rerank"] == str(ar_checkpoint) and result["candidates"] == 2
    assert main(["evaluate", *common, "--rerank", str(ar_checkpoint)]) != 0
    assert "--candidates N" in capsys.readouterr().err
    assert main(["evaluate", *common, "--candidates", "2", "--rerank", str(tiny_checkpoint)]) != 0
    assert "needs an autoregressive model" in capsys.readouterr().err


def test_caption_rerank(tiny_checkpoint: Path, ar_checkpoint: Path, shapes_jsonl: Path, capsys) -> None:
    """`Captioner(..., rerank=AR)` and `diffcap caption --rerank AR --candidates N` keep, for each image, the
    candidate the autoregressive model finds most likely."""
    from diffcap.captioner import Captioner
    from diffcap.cli import main

    images = sorted((shapes_jsonl.parent / "images").glob("dev_*.png"))[:3]
    captioner = Captioner.from_pretrained(tiny_checkpoint, rerank=ar_checkpoint)
    results = list(captioner.caption_stream(images, steps=2, candidates=3))
    ar, _ = load_model(ar_checkpoint)
    for path, result in zip(images, results):
        assert len(result.candidates) == 3
        image = captioner.features([path] * 3)
        scores = caption_log_likelihood(ar, image, result.candidates)
        assert result.caption == result.candidates[int(scores.argmax())]
    with pytest.raises(ValueError, match="several samples"):
        captioner.caption(images, steps=2)

    args = ["caption", "--checkpoint", str(tiny_checkpoint), *map(str, images), "--steps", "2", "--json"]
    assert main([*args, "--candidates", "3", "--rerank", str(ar_checkpoint)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["caption"] for r in printed] == [r.caption for r in results]
    assert main([*args, "--rerank", str(ar_checkpoint)]) != 0
    assert "--candidates N" in capsys.readouterr().err
    assert main([*args, "--candidates", "2", "--rerank", str(tiny_checkpoint)]) != 0
    assert "needs an autoregressive model" in capsys.readouterr().err
