"""Glue between datasets, encoders and the feature cache: what train/evaluate need, ready to use."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcap.config import DataConfig
from diffcap.data.datasets import ImageRecord, load_split
from diffcap.data.features import FeatureCache, FeatureCacheError, merge_caches
from diffcap.encoders.base import ImageEncoder, build_encoder
from diffcap.models.denoiser import ImageFeatures

log = logging.getLogger("diffcap")


def default_cache_dir(dataset: str, root: Path, encoder_name: str, base: Path = Path("runs/features")) -> Path:
    """runs/features/<dataset>-<hash of the root path>-<encoder>: one cache per dataset copy and encoder."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    return base / f"{dataset}-{digest}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', encoder_name)}"


def split_records(data: DataConfig, split: str, root: str | None = None, *,
                  keep_missing: bool = False) -> list[ImageRecord]:
    return load_split(
        data.dataset, Path(root or data.root), split,
        image_root=Path(data.image_root) if data.image_root else None,
        annotations=Path(data.annotations) if data.annotations else None,
        keep_missing=keep_missing,
    )


def distributed_state() -> Any | None:
    """accelerate's PartialState when this process is one of several (`accelerate launch`), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    # cpu=True on a machine without GPUs: a plain PartialState() there would not join the process group
    return PartialState(cpu=not torch.cuda.is_available())


def ensure_features(encoder: ImageEncoder, records: list[ImageRecord], cache_dir: Path, *,
                    on_error: str = "skip", batch_size: int = 64, state: Any | None = None,
                    progress: bool = True) -> FeatureCache:
    """The feature cache of `records` at `cache_dir`, computing only what it lacks.

    A cache built with this encoder's identity that holds every image (or knows it is unreadable) is opened as
    it is; images it lacks are computed and merged in; a cache of another encoder setup is rebuilt. Unreadable
    images are skipped, recorded in the cache's `failed` and listed in a warning (on_error="skip"), so one
    broken file never costs the other images' work; on_error="fail" stops at the first one instead.

    `state` (accelerate's PartialState, every process calling this together): each process encodes every
    N-th missing image into a shard next to `cache_dir` and the main process merges the shards into one cache.
    All processes must see `cache_dir` (one machine, or a shared filesystem across nodes)."""
    wanted = {r.key: r.path for r in records}
    world = getattr(state, "num_processes", 1) if state is not None else 1
    rank = getattr(state, "process_index", 0) if state is not None else 0
    cache_dir = Path(cache_dir)
    existing: FeatureCache | None = None
    try:
        existing = FeatureCache.open(cache_dir, expected_identity=encoder.identity())
        todo = [k for k in wanted if k not in existing and k not in existing.failed]
        if todo:
            log.info("feature cache %s lacks %d of %d images; computing them", cache_dir, len(todo), len(wanted))
    except FeatureCacheError as exc:
        todo = list(wanted)
        log.info("computing image features into %s (%s)", cache_dir, exc)
    if world > 1:
        seen = _all_gather(len(todo), world)
        if len(set(seen)) > 1:
            raise FeatureCacheError(
                f"the processes see different feature caches at {cache_dir} (missing images per process: {seen}); "
                "put data.cache_dir on a filesystem every node shares, or run `diffcap features` on every node first"
            )
    if not todo:
        assert existing is not None
        return existing
    if world == 1 and existing is None:
        return FeatureCache.build(encoder, {k: wanted[k] for k in todo}, cache_dir, on_error=on_error,  # type: ignore[arg-type]
                                  batch_size=batch_size, progress=progress)

    # Each process computes a shard (a complete little cache, kept if a crash interrupts the rest), then the
    # main process merges the existing cache and the shards.
    shards = [cache_dir.parent / f".{cache_dir.name}.shard-{r}-of-{world}" for r in range(world)]
    mine = {k: wanted[k] for k in todo[rank::world]}
    error: BaseException | None = None
    try:
        if mine and not _holds(shards[rank], mine, encoder):
            if state is not None and hasattr(state, "device"):
                encoder.to(state.device)
            FeatureCache.build(encoder, mine, shards[rank], on_error=on_error, batch_size=batch_size,  # type: ignore[arg-type]
                               progress=progress and rank == 0, allow_empty=True)
    except Exception as exc:  # noqa: BLE001 - reported on every process below
        error = exc
    _raise_any(error, _all_gather(None if error is None else f"process {rank}: {error}", world) if world > 1 else [])
    if rank == 0:
        try:
            parts = [FeatureCache.open(shard) for shard, r in zip(shards, range(world)) if todo[r::world]]
            merge_caches(([existing] if existing is not None else []) + parts, cache_dir)
            for shard in shards:
                shutil.rmtree(shard, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001
            error = exc
    _raise_any(error, _all_gather(None if error is None else f"process {rank}: {error}", world) if world > 1 else [])
    return FeatureCache.open(cache_dir, expected_identity=encoder.identity())


def _holds(directory: Path, images: dict[str, Path], encoder: ImageEncoder) -> bool:
    """Whether `directory` is a finished shard of exactly these images (left by an interrupted run)."""
    try:
        shard = FeatureCache.open(directory, expected_identity=encoder.identity())
    except FeatureCacheError:
        return False
    return set(shard.keys) | set(shard.failed) == set(images)


def _all_gather(value: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def _raise_any(own: BaseException | None, reports: list[str | None]) -> None:
    """Raise on every process if any process failed: its own exception, or one naming the other's."""
    if own is not None:
        raise own
    others = [r for r in reports if r is not None]
    if others:
        raise FeatureCacheError("feature extraction failed in another process: " + "; ".join(others))


@dataclass
class FeatureTable:
    """Image features of a set of images, in memory, addressed by row."""

    keys: list[str]
    pooled: torch.Tensor  # (M, Dp) float16
    grid: torch.Tensor  # (M, N, Dg) float16

    @classmethod
    def from_cache(cls, cache: FeatureCache, keys: list[str]) -> FeatureTable:
        rows = cache.index(keys)
        # read as stored (float16): a float32 copy of the train grid first would cost 1.5 GB more at peak
        return cls(list(keys), cache.pooled(rows, np.float16), cache.grid(rows, np.float16))

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
