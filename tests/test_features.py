"""Tests for diffcap.data.features.FeatureCache."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from diffcap.data.features import FeatureCache, FeatureCacheError, merge_caches
from diffcap.data.images import ImageLoadError, load_image
from diffcap.encoders.base import EncoderOutput, ImageEncoder, ImageTransform


class FakeEncoder(ImageEncoder):
    """Tiny deterministic encoder: 8x8 pixels -> 2x2 grid of 6-dim features."""

    name = "fake"
    pooled_dim = 5
    grid_dim = 6
    grid_size = 2

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Linear(3 * 16, 6)
        self.head = torch.nn.Linear(6, 5)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
        self.transform = ImageTransform(size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
        self.scale = scale
        self.freeze()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.transform(images)  # (B, 3, 8, 8)

    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        patches = pixels.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, 3, 2, 2, 4, 4)
        patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (B, 4, 48)
        grid = self.proj(patches)  # (B, 4, 6)
        return EncoderOutput(pooled=self.head(grid.mean(dim=1)), grid=grid)

    def identity(self) -> dict[str, object]:
        return {"encoder": self.name, "scale": self.scale, **self.transform.identity()}


def _images(directory: Path, count: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    images = {}
    for i in range(count):
        path = directory / f"img{i}.png"
        size = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        images[f"key{i}"] = path
    return images


def _direct(encoder: ImageEncoder, paths: list[Path]) -> EncoderOutput:
    return encoder(encoder.preprocess([load_image(p) for p in paths]))


def test_round_trip_matches_direct_encoder_output(tmp_path: Path) -> None:
    encoder = FakeEncoder()
    images = _images(tmp_path, 7)
    built = FeatureCache.build(encoder, images, tmp_path / "cache", batch_size=3, progress=False)
    cache = FeatureCache.open(tmp_path / "cache", expected_identity=encoder.identity())
    assert len(cache) == len(built) == 7 and cache.keys == list(images)
    assert "key3" in cache and "nope" not in cache
    assert cache.failed == {}

    order = ["key5", "key0", "key6"]
    rows = cache.index(order)
    expected = _direct(encoder, [images[k] for k in order])
    pooled, grid = cache.pooled(rows), cache.grid(rows)
    assert pooled.dtype == grid.dtype == torch.float32
    assert pooled.shape == (3, 5) and grid.shape == (3, 4, 6)
    torch.testing.assert_close(pooled, expected.pooled, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(grid, expected.grid, rtol=1e-3, atol=1e-2)

    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["dtype"] == "float16" and meta["shapes"]["grid"] == [7, 4, 6]
    assert np.load(tmp_path / "cache" / "grid.npy", mmap_mode="r").dtype == np.float16
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_index_reports_missing_keys(tmp_path: Path) -> None:
    cache = FeatureCache.build(FakeEncoder(), _images(tmp_path, 2), tmp_path / "c", progress=False)
    with pytest.raises(KeyError, match="missing_a"):
        cache.index(["key0", "missing_a", "missing_b"])


def test_open_with_different_identity_names_the_field(tmp_path: Path) -> None:
    FeatureCache.build(FakeEncoder(), _images(tmp_path, 2), tmp_path / "c", progress=False)
    with pytest.raises(FeatureCacheError, match="scale") as info:
        FeatureCache.open(tmp_path / "c", expected_identity=FakeEncoder(scale=2.0).identity())
    assert "diffcap features" in str(info.value)


def test_open_missing_cache_fails(tmp_path: Path) -> None:
    with pytest.raises(FeatureCacheError, match="diffcap features"):
        FeatureCache.open(tmp_path / "nothing")


def test_corrupt_image_is_skipped_and_reported(tmp_path: Path) -> None:
    images = _images(tmp_path, 4)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    images = {"key0": images["key0"], "bad": bad, "key1": images["key1"]}
    with pytest.warns(UserWarning, match="bad"):
        cache = FeatureCache.build(FakeEncoder(), images, tmp_path / "c", batch_size=2, progress=False)
    assert cache.keys == ["key0", "key1"]
    assert "bad" not in cache and "bad.jpg" in cache.failed["bad"]
    reopened = FeatureCache.open(tmp_path / "c")
    assert reopened.failed == cache.failed and len(reopened) == 2
    assert reopened.grid(reopened.index(["key1"])).shape == (1, 4, 6)
    with pytest.raises(KeyError, match="failed to load"):
        reopened.index(["bad"])


def test_corrupt_image_fails_with_on_error_fail(tmp_path: Path) -> None:
    images = _images(tmp_path, 2)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    images["bad"] = bad
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        FeatureCache.build(FakeEncoder(), images, tmp_path / "c", on_error="fail", progress=False)
    assert not (tmp_path / "c").exists()


def test_interrupted_build_leaves_no_accepted_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = FakeEncoder()
    images = _images(tmp_path, 6)
    calls = {"n": 0}
    real_forward = FakeEncoder.forward

    def failing_forward(self, pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real_forward(self, pixels)

    monkeypatch.setattr(FakeEncoder, "forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache.build(encoder, images, tmp_path / "c", batch_size=2, progress=False)
    with pytest.raises(FeatureCacheError):
        FeatureCache.open(tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.suffix == ".png") == []


def test_interrupted_rebuild_keeps_old_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _images(tmp_path, 4)
    FeatureCache.build(FakeEncoder(), images, tmp_path / "c", progress=False)
    monkeypatch.setattr(FakeEncoder, "forward", lambda self, pixels: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        FeatureCache.build(FakeEncoder(scale=2.0), images, tmp_path / "c", progress=False)
    old = FeatureCache.open(tmp_path / "c", expected_identity=FakeEncoder().identity())
    assert len(old) == 4


def test_rebuild_replaces_cache_with_new_identity(tmp_path: Path) -> None:
    images = _images(tmp_path, 3)
    FeatureCache.build(FakeEncoder(), images, tmp_path / "c", progress=False)
    FeatureCache.build(FakeEncoder(scale=2.0), images, tmp_path / "c", progress=False)
    assert FeatureCache.open(tmp_path / "c", FakeEncoder(scale=2.0).identity()).identity["scale"] == 2.0


def test_refuses_to_overwrite_a_non_cache_directory(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.txt").write_text("keep me")
    with pytest.raises(FeatureCacheError, match="not a feature cache"):
        FeatureCache.build(FakeEncoder(), _images(tmp_path, 1), target, progress=False)
    assert (target / "thesis.txt").read_text() == "keep me"


def test_real_efficientnet_round_trip(tmp_path: Path) -> None:
    from diffcap.encoders.efficientnet import EfficientNetLite0Encoder

    encoder = EfficientNetLite0Encoder()
    images = _images(tmp_path, 2)
    cache = FeatureCache.build(encoder, images, tmp_path / "c", progress=False)
    cache = FeatureCache.open(tmp_path / "c", expected_identity=encoder.identity())
    expected = _direct(encoder, list(images.values()))
    rows = cache.index(list(images))
    assert cache.grid(rows).shape == (2, 49, 1280)
    torch.testing.assert_close(cache.pooled(rows), expected.pooled, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(cache.grid(rows), expected.grid, rtol=2e-3, atol=4e-3)


# -- shards, merging and adding images (RELIABILITY.md) -----------------------------------------------------------


def _records(images: dict[str, Path]):
    from diffcap.data.datasets import ImageRecord

    return [ImageRecord(key=k, path=p, captions=("a caption",)) for k, p in images.items()]


def _bad_and_odd_images(directory: Path) -> dict[str, Path]:
    """Good images, unusual but valid ones (converted) and broken ones (skipped), interleaved."""
    images = _images(directory, 3)
    odd = {
        "one_pixel": Image.new("RGB", (1, 1), (200, 10, 10)),
        "gray": Image.new("L", (9, 7), 128),
        "cmyk": Image.new("CMYK", (8, 8), (0, 255, 0, 0)),
        "deep16": Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16)),
        "alpha": Image.new("RGBA", (5, 5), (0, 0, 255, 100)),
    }
    for key, img in odd.items():
        path = directory / f"{key}.{'jpg' if key == 'cmyk' else 'png'}"
        img.save(path)
        images[key] = path
    (directory / "text.jpg").write_text("not a picture")
    (directory / "half.png").write_bytes((directory / "img0.png").read_bytes()[:60])
    images = {"text": directory / "text.jpg", **images, "half": directory / "half.png"}
    return images


def test_merge_of_shards_equals_one_build(tmp_path: Path) -> None:
    encoder = FakeEncoder()
    images = _bad_and_odd_images(tmp_path)
    with pytest.warns(UserWarning):
        whole = FeatureCache.build(encoder, images, tmp_path / "whole", batch_size=1, progress=False)
    items = list(images.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each shard warns about its own broken images
        shards = [FeatureCache.build(encoder, dict(items[rank::3]), tmp_path / f"shard{rank}", batch_size=1,
                                     progress=False, allow_empty=True) for rank in range(3)]
    merged = merge_caches(shards, tmp_path / "merged")
    assert sorted(merged.keys) == sorted(whole.keys) and len(merged) == 8
    assert merged.failed == whole.failed and set(merged.failed) == {"text", "half"}
    keys = whole.keys
    assert torch.equal(merged.pooled(merged.index(keys)), whole.pooled(whole.index(keys)))
    assert torch.equal(merged.grid(merged.index(keys)), whole.grid(whole.index(keys)))
    assert FeatureCache.open(tmp_path / "merged", expected_identity=encoder.identity()).keys == merged.keys
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_empty_shard_is_allowed_only_when_asked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(FeatureCacheError, match="none of the 1 images.*bad.jpg"):
        FeatureCache.build(FakeEncoder(), {"bad": bad}, tmp_path / "c", progress=False)
    with pytest.warns(UserWarning):
        shard = FeatureCache.build(FakeEncoder(), {"bad": bad}, tmp_path / "c", progress=False, allow_empty=True)
    assert len(shard) == 0 and list(shard.failed) == ["bad"]


def test_merge_refuses_caches_of_different_encoders(tmp_path: Path) -> None:
    images = _images(tmp_path, 2)
    a = FeatureCache.build(FakeEncoder(), images, tmp_path / "a", progress=False)
    b = FeatureCache.build(FakeEncoder(scale=2.0), images, tmp_path / "b", progress=False)
    with pytest.raises(FeatureCacheError, match="different encoder setups.*scale"):
        merge_caches([a, b], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_broken_images_cost_nothing_of_the_others_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A dataset with broken files among good and unusual ones: the broken ones are skipped and listed, every
    other image is cached, and a second run (or one with images added) recomputes nothing it already has."""
    from diffcap.data.prepare import ensure_features

    encoder = FakeEncoder()
    images = _bad_and_odd_images(tmp_path)
    with pytest.warns(UserWarning, match=r"2 image\(s\) could not be loaded[\s\S]*text.jpg[\s\S]*half.png"):
        cache = ensure_features(encoder, _records(images), tmp_path / "cache", batch_size=2, progress=False)
    assert set(cache.keys) == set(images) - {"text", "half"}
    assert "not a recognised image format" in cache.failed["text"] and "half.png" in cache.failed["half"]

    encoded: list[int] = []
    real_forward = FakeEncoder.forward

    def counting_forward(self, pixels):
        encoded.append(len(pixels))
        return real_forward(self, pixels)

    monkeypatch.setattr(FakeEncoder, "forward", counting_forward)
    again = ensure_features(encoder, _records(images), tmp_path / "cache", progress=False)
    assert encoded == [] and again.keys == cache.keys  # nothing recomputed, broken files not retried

    (tmp_path / "more").mkdir()
    more = {**images, **{f"new{k}": p for k, p in _images(tmp_path / "more", 2).items()}}
    before = cache.grid(cache.index(cache.keys))
    grown = ensure_features(encoder, _records(more), tmp_path / "cache", progress=False)
    assert sum(encoded) == 2  # only the two new images
    assert set(grown.keys) == set(cache.keys) | {"newkey0", "newkey1"} and set(grown.failed) == {"text", "half"}
    assert torch.equal(grown.grid(grown.index(cache.keys)), before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    with pytest.raises(ImageLoadError, match="text.jpg"):
        ensure_features(encoder, _records(images), tmp_path / "strict", on_error="fail", progress=False)


def test_cache_of_another_encoder_setup_is_rebuilt_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from diffcap.data.prepare import ensure_features

    images = _images(tmp_path, 3)
    ensure_features(FakeEncoder(), _records(images), tmp_path / "cache", progress=False)
    other = FakeEncoder(scale=2.0)  # other weights / preprocessing: another identity
    with caplog.at_level("INFO", logger="diffcap"):
        cache = ensure_features(other, _records(images), tmp_path / "cache", progress=False)
    assert "different encoder setup" in caplog.text and "scale" in caplog.text
    assert cache.identity["scale"] == 2.0 and len(cache) == 3
    expected = _direct(other, [images["key0"]])
    torch.testing.assert_close(cache.pooled(cache.index(["key0"])), expected.pooled, rtol=1e-3, atol=1e-2)
