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


def test_a_stored_matcher_scores_as_the_fitted_one() -> None:
    pooled, sentences, owners = paired_data(20, 2, seed=3)
    matcher = fit_matcher(pooled, sentences, owners, epochs=2, batch_size=8)
    again = ImageTextMatcher.from_tensors({"other.weight": torch.zeros(1), **matcher.tensors()})
    assert again is not None and again.shape == matcher.shape
    assert torch.allclose(again.similarity(pooled[owners], sentences), matcher.similarity(pooled[owners], sentences))
    assert ImageTextMatcher.from_tensors({"other.weight": torch.zeros(1)}) is None


def test_fit_matcher_command_and_select_match(tiny_checkpoint, shapes_jsonl, tmp_path, capsys) -> None:
    """`diffcap fit-matcher` stores a matcher (weights untouched, only on training images), and with it
    `select="match"` keeps, for each image, the candidate the matcher scores highest."""
    import json
    import shutil

    from diffcap.captioner import Captioner
    from diffcap.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from diffcap.cli import main
    from diffcap.models.denoiser import ImageFeatures
    from diffcap.pipeline import export_model, generate, load_model, matcher_scores

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    before = load_checkpoint(ckpt)[2]
    model, _ = load_model(ckpt)
    g = torch.Generator().manual_seed(0)
    shape = model.denoiser.shape
    image = ImageFeatures(torch.randn(3, shape.pooled_dim, generator=g), torch.randn(3, 4, shape.grid_dim, generator=g))
    with pytest.raises(ValueError, match="no image–text matcher"):
        generate(model, image, steps=2, candidates=2, select="match")
    common = ["--dataset", "jsonl", "--root", str(shapes_jsonl), "--cache-dir", str(tmp_path / "cache")]
    assert main(["fit-matcher", str(ckpt), "--split", "dev", *common]) != 0  # never on the scored split
    assert "were not training images" in capsys.readouterr().err
    assert main(["fit-matcher", str(ckpt), *common]) == 0
    assert "fitted an image-text matcher on 8 train images" in capsys.readouterr().out
    after = load_checkpoint(ckpt)[2]
    assert all(torch.equal(after[k], v) for k, v in before.items())
    model, _ = load_model(ckpt)
    assert model.matcher is not None
    out = generate(model, image, steps=2, candidates=4, select="match")
    for i, row in enumerate(out.candidates):
        rows = ImageFeatures(image.pooled[i: i + 1].repeat(4, 1), image.grid[i: i + 1].repeat(4, 1, 1))
        assert out.captions[i] == row[int(matcher_scores(model, rows, row).argmax())]
    assert generate(model, image, steps=2, candidates=4).candidates == out.candidates  # the same samples
    # `caption --select match` (and Captioner's select=) keeps the matcher's choice among each photo's samples
    photos = sorted((shapes_jsonl.parent / "images").glob("dev_*.png"))
    assert main(["caption", str(ckpt), *map(str, photos), "--steps", "2", "--candidates", "4", "--select", "match",
                 "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == len(photos) == 4
    captioner = Captioner.from_pretrained(ckpt)
    features = captioner.features(photos)
    for i, record in enumerate(records):
        rows = ImageFeatures(features.pooled[i: i + 1].repeat(4, 1), features.grid[i: i + 1].repeat(4, 1, 1))
        assert record["caption"] == record["candidates"][int(matcher_scores(model, rows, record["candidates"]).argmax())]
    assert captioner.caption(photos, steps=2, candidates=4, select="match") == [r["caption"] for r in records]
    # without a matcher, a clear one-line refusal
    assert main(["caption", str(tiny_checkpoint), str(photos[0]), "--candidates", "2", "--select", "match"]) == 2
    err = capsys.readouterr().err
    assert "no image–text matcher" in err and "Traceback" not in err
    exported = load_model(export_model(ckpt, tmp_path / "exported"))[0]  # fp16 matcher, same choice
    assert exported.matcher is not None and exported.matcher.shape == model.matcher.shape
    # an exported copy can carry the choice as its sampling default (how the shipped checkpoint uses its matcher)
    assert main(["export", str(ckpt), str(tmp_path / "choosing"), "sample.candidates=4", "sample.select=match"]) == 0
    assert "with sampling defaults sample.candidates=4 sample.select=match" in capsys.readouterr().out
    choosing = Captioner.from_pretrained(tmp_path / "choosing")
    assert (choosing.model.config.sample.candidates, choosing.model.config.sample.select) == (4, "match")
    assert choosing.caption(photos, steps=2) == choosing.caption(photos, steps=2, candidates=4, select="match")
    assert main(["caption", str(tmp_path / "choosing"), *map(str, photos), "--steps", "2", "--json"]) == 0
    assert all(len(r["candidates"]) == 4 for r in json.loads(capsys.readouterr().out))
    again = export_model(tmp_path / "choosing", tmp_path / "again")  # a copy of a copy names the trained checkpoint
    assert load_checkpoint(again)[1]["exported_from"] == load_checkpoint(tmp_path / "choosing")[1]["exported_from"] \
        == str(ckpt)
    assert main(["export", str(tiny_checkpoint), str(tmp_path / "x"), "sample.candidates=4", "sample.select=match"]) == 2
    assert "no image–text matcher" in capsys.readouterr().err  # nothing to choose with
    assert main(["export", str(ckpt), str(tmp_path / "x"), "model.layers=1"]) == 2
    assert "only sampling defaults" in capsys.readouterr().err
    assert main(["export", str(ckpt), str(tmp_path / "x"), "sample.candidates=0"]) == 2
    assert "sample.candidates" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # a damaged matcher is a clear checkpoint error, not a traceback from load_state_dict
    config, meta, tensors = load_checkpoint(ckpt)
    del tensors["matcher.text.0.weight"]
    save_checkpoint(ckpt, config_json=json.dumps(config), tensors=tensors,
                    meta={k: v for k, v in meta.items() if k != "format_version"})
    with pytest.raises(CheckpointError, match="matcher is damaged"):
        load_model(ckpt)


def test_config_checks_the_selection_fields() -> None:
    from diffcap.config import ConfigError, load_config

    config = load_config("default", ["sample.select=match", "sample.match_weight=2"])
    assert (config.sample.select, config.sample.match_weight) == ("match", 2.0)
    with pytest.raises(ConfigError, match="match_weight"):
        load_config("default", ["sample.match_weight=-1"])
    with pytest.raises(ConfigError, match="select"):
        load_config("default", ["sample.select=best"])
