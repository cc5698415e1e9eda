"""Glue between datasets, encoders and the feature cache: what train/evaluate need, ready to use."""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcap.config import DataConfig
from diffcap.data.datasets import ImageRecord, load_split
from diffcap.data.features import FeatureCache, FeatureCacheError
from diffcap.encoders.base import ImageEncoder, build_encoder
from diffcap.models.denoiser import ImageFeatures

log = logging.getLogger("diffcap")


def default_cache_dir(dataset: str, root: Path, encoder_name: str, base: Path = Path("runs/features")) -> Path:
    """runs/features/<dataset>-<hash of the root path>-<encoder>: one cache per dataset copy and encoder."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return base / f"{dataset}-{digest}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', encoder_name)}"


def split_records(data: DataConfig, split: str, root: str | None = None) -> list[ImageRecord]:
    return load_split(
        data.dataset, Path(root or data.root), split,
        image_root=Path(data.image_root) if data.image_root else None,
        annotations=Path(data.annotations) if data.annotations else None,
    )


def ensure_features(encoder: ImageEncoder, records: list[ImageRecord], cache_dir: Path, *,
                    on_error: str = "skip", batch_size: int = 64) -> FeatureCache:
    """Open the cache if it holds every image with this encoder's identity; otherwise (re)build it."""
    wanted = {r.key: r.path for r in records}
    try:
        cache = FeatureCache.open(cache_dir, expected_identity=encoder.identity())
        missing = [k for k in wanted if k not in cache and k not in cache.failed]
        if not missing:
            return cache
        log.info("feature cache %s lacks %d images; rebuilding it", cache_dir, len(missing))
    except FeatureCacheError as exc:
        log.info("computing image features into %s (%s)", cache_dir, exc)
    return FeatureCache.build(encoder, wanted, cache_dir, on_error=on_error, batch_size=batch_size)  # type: ignore[arg-type]


@dataclass
class FeatureTable:
    """Image features of a set of images, in memory, addressed by row."""

    keys: list[str]
    pooled: torch.Tensor  # (M, Dp) float16
    grid: torch.Tensor  # (M, N, Dg) float16

    @classmethod
    def from_cache(cls, cache: FeatureCache, keys: list[str]) -> FeatureTable:
        rows = cache.index(keys)
        return cls(list(keys), cache.pooled(rows).half(), cache.grid(rows).half())

    def batch(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> ImageFeatures:
        return ImageFeatures(self.pooled[rows].float().to(device), self.grid[rows].float().to(device))

    def shuffled(self, seed: int = 0) -> FeatureTable:
        """The control: every image gets another image's features (a derangement of the rows)."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.keys), generator=g)
        source = torch.empty_like(order)
        source[order] = order.roll(-1)  # image order[i] gets the features of image order[i + 1]
        return FeatureTable(self.keys, self.pooled[source], self.grid[source])


@functools.lru_cache(maxsize=2)
def load_encoder(name: str) -> ImageEncoder:
    return build_encoder(name)
