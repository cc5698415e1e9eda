"""On-disk cache of image encoder features.

Layout of a cache directory::

    meta.json   format version, encoder identity, keys in row order,
                failed images with reasons, array shapes and dtype
    pooled.npy  (K, Dp)     float16
    grid.npy    (K, N, Dg)  float16

Arrays are opened with ``np.load(mmap_mode="r")`` and rows are converted to
float32 tensors on access. :meth:`FeatureCache.build` writes everything into a
temporary sibling directory and renames it into place at the very end, so an
interrupted build never leaves a cache that :meth:`FeatureCache.open` accepts
(an older cache at the same place stays untouched until the rename).
:func:`merge_caches` joins caches of the same encoder setup into one, the same way: it is how shards computed
by several processes (``data/prepare.py``) and images added to an existing cache end up in one cache.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from diffcap.data.images import ImageLoadError, load_image
from diffcap.encoders.base import ImageEncoder

FORMAT_VERSION = 1
META_FILE = "meta.json"
POOLED_FILE = "pooled.npy"
GRID_FILE = "grid.npy"
DTYPE = np.float16
REBUILD_HINT = "rebuild it with `diffcap features ...` (see `diffcap features --help`)"

Rows = int | slice | Sequence[int] | np.ndarray


class FeatureCacheError(Exception):
    """A feature cache is missing, incomplete, stale or built by another encoder."""


@dataclass(eq=False)
class FeatureCache:
    """Read access to a feature cache; build one with :meth:`build`."""

    directory: Path
    keys: list[str]
    identity: dict[str, Any]
    failed: dict[str, str]
    _pooled: np.ndarray = field(repr=False)  # (K, Dp) float16 memmap
    _grid: np.ndarray = field(repr=False)  # (K, N, Dg) float16 memmap
    _rows: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rows = {key: row for row, key in enumerate(self.keys)}

    # ----------------------------------------------------------------- reading
    @classmethod
    def open(cls, directory: Path, expected_identity: dict | None = None) -> FeatureCache:
        """Open a cache; raise :class:`FeatureCacheError` if it is missing,
        incomplete, or its identity differs from ``expected_identity``."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FeatureCacheError(f"no feature cache at {directory} (missing {META_FILE}); {REBUILD_HINT}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise FeatureCacheError(f"unreadable {meta_path}: {exc}; {REBUILD_HINT}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise FeatureCacheError(
                f"feature cache {directory} has format version {meta.get('format_version')!r}, "
                f"expected {FORMAT_VERSION}; {REBUILD_HINT}"
            )
        if expected_identity is not None:
            differences = identity_differences(expected_identity, meta["identity"])
            if differences:
                raise FeatureCacheError(
                    f"feature cache {directory} was built with a different encoder setup: "
                    + "; ".join(differences)
                    + f"; {REBUILD_HINT}"
                )
        pooled = _load_array(directory / POOLED_FILE, meta["shapes"]["pooled"])
        grid = _load_array(directory / GRID_FILE, meta["shapes"]["grid"])
        keys = list(meta["keys"])
        if len(keys) != pooled.shape[0] or len(set(keys)) != len(keys):
            raise FeatureCacheError(f"feature cache {directory} has inconsistent keys; {REBUILD_HINT}")
        return cls(directory, keys, meta["identity"], dict(meta["failed"]), pooled, grid)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def index(self, keys: list[str]) -> np.ndarray:
        """Row indices of ``keys``; KeyError listing (a few of) the missing ones."""
        missing = [key for key in keys if key not in self._rows]
        if missing:
            shown = ", ".join(
                repr(k) + (f" (failed to load: {self.failed[k]})" if k in self.failed else "")
                for k in missing[:5]
            )
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise KeyError(f"{len(missing)} key(s) not in feature cache {self.directory}: {shown}{more}")
        return np.fromiter((self._rows[key] for key in keys), dtype=np.int64, count=len(keys))

    def pooled(self, rows: Rows, dtype: type = np.float32) -> torch.Tensor:
        """Pooled features of ``rows``, (B, Dp): float32, or ``np.float16`` as stored (no conversion copy)."""
        return torch.from_numpy(np.asarray(self._pooled[_as_index(rows)], dtype=dtype))

    def grid(self, rows: Rows, dtype: type = np.float32) -> torch.Tensor:
        """Grid features of ``rows``, (B, N, Dg): float32, or ``np.float16`` as stored (no conversion copy)."""
        return torch.from_numpy(np.asarray(self._grid[_as_index(rows)], dtype=dtype))

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        encoder: ImageEncoder,
        images: dict[str, Path],
        directory: Path,
        *,
        on_error: Literal["skip", "fail"] = "skip",
        batch_size: int = 64,
        progress: bool = True,
        allow_empty: bool = False,
    ) -> FeatureCache:
        """Encode ``images`` (key -> path) and write a new cache to ``directory``.

        Always recomputes; an existing cache at ``directory`` is replaced only
        once the new one is complete. Unreadable images are recorded in
        ``failed`` and warned about (``on_error="skip"``) or raise
        :class:`ImageLoadError` (``on_error="fail"``). A cache in which no
        image could be loaded is an error unless ``allow_empty`` (a shard).
        """
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
        if not images:
            raise ValueError("no images to encode")
        directory = Path(directory)
        tmp = _temporary_sibling(directory)
        try:
            writer = _ArrayWriter(tmp, len(images), encoder)
            failed = _encode_all(encoder, images, writer, on_error, batch_size, progress)
            if writer.count == 0 and not allow_empty:
                listed = "; ".join(f"{key}: {reason}" for key, reason in list(failed.items())[:5])
                raise FeatureCacheError(f"none of the {len(images)} images could be loaded ({listed})")
            writer.finish()
            meta = {
                "format_version": FORMAT_VERSION,
                "identity": encoder.identity(),
                "keys": writer.keys,
                "failed": failed,
                "shapes": {"pooled": list(writer.pooled_shape), "grid": list(writer.grid_shape)},
                "dtype": np.dtype(DTYPE).name,
            }
            _write_json(tmp / META_FILE, meta)
            _replace_dir(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
        if failed:
            listed = "\n".join(f"  {key}: {reason}" for key, reason in failed.items())
            warnings.warn(f"{len(failed)} image(s) could not be loaded and were skipped:\n{listed}", stacklevel=2)
        return cls.open(directory)


def merge_caches(sources: Sequence[FeatureCache], directory: Path, *, chunk: int = 1024) -> FeatureCache:
    """Write one cache holding the rows of every source to ``directory`` (atomically, like :meth:`build`).

    The sources must come from the same encoder setup (identity) and may overlap: a key's first occurrence
    wins. Failed images of the sources stay recorded unless another source holds their features. A source may
    be the cache at ``directory`` itself (it is read before being replaced).
    """
    if not sources:
        raise ValueError("no feature caches to merge")
    first = sources[0]
    for other in sources[1:]:
        differences = identity_differences(first.identity, other.identity)
        if differences:
            raise FeatureCacheError(
                f"cannot merge feature caches {first.directory} and {other.directory}: they were built with "
                f"different encoder setups ({'; '.join(differences)})"
            )
        if other._pooled.shape[1:] != first._pooled.shape[1:] or other._grid.shape[1:] != first._grid.shape[1:]:
            raise FeatureCacheError(f"cannot merge feature caches {first.directory} and {other.directory}: "
                                    "their feature shapes differ")
    taken: dict[str, tuple[int, int]] = {}  # key -> (source, row), grouped by source in order: the output order
    for s_index, source in enumerate(sources):
        for row, key in enumerate(source.keys):
            taken.setdefault(key, (s_index, row))
    failed: dict[str, str] = {}
    for source in sources:
        failed.update({k: v for k, v in source.failed.items() if k not in taken and k not in failed})
    keys = list(taken)
    directory = Path(directory)
    tmp = _temporary_sibling(directory)
    try:
        pooled_shape = (len(keys), *first._pooled.shape[1:])
        grid_shape = (len(keys), *first._grid.shape[1:])
        pooled, grid = _create(tmp / POOLED_FILE, pooled_shape), _create(tmp / GRID_FILE, grid_shape)
        out = 0
        for s_index, source in enumerate(sources):
            rows = np.array([row for s, row in taken.values() if s == s_index], dtype=np.int64)
            for start in range(0, len(rows), chunk):
                part = rows[start : start + chunk]
                pooled[out : out + len(part)] = source._pooled[part]
                grid[out : out + len(part)] = source._grid[part]
                out += len(part)
        for name, array in ((POOLED_FILE, pooled), (GRID_FILE, grid)):
            array.flush()
            _fsync(tmp / name)
        del pooled, grid
        meta = {
            "format_version": FORMAT_VERSION,
            "identity": first.identity,
            "keys": keys,
            "failed": failed,
            "shapes": {"pooled": list(pooled_shape), "grid": list(grid_shape)},
            "dtype": np.dtype(DTYPE).name,
        }
        _write_json(tmp / META_FILE, meta)
        _replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return FeatureCache.open(directory)


def identity_differences(expected: dict, actual: dict) -> list[str]:
    """Human-readable list of the fields whose values differ between two identities."""
    expected = json.loads(json.dumps(expected))  # tuples -> lists, as stored
    differences = []
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            differences.append(f"{name}: cache has {actual.get(name)!r}, expected {expected.get(name)!r}")
    return differences


# --------------------------------------------------------------------- helpers
@dataclass
class _Batch:
    keys: list[str]
    pixels: torch.Tensor | None  # (B, 3, H, W), None when every image failed
    failed: dict[str, str]


def _load_batch(
    encoder: ImageEncoder, items: list[tuple[str, Path]], on_error: str
) -> _Batch:
    keys, loaded, failed = [], [], {}
    for key, path in items:
        try:
            loaded.append(load_image(path))
            keys.append(key)
        except ImageLoadError as exc:
            if on_error == "fail":
                raise
            failed[key] = str(exc)
    pixels = encoder.preprocess(loaded) if loaded else None
    return _Batch(keys, pixels, failed)


def _batches(
    encoder: ImageEncoder, images: dict[str, Path], on_error: str, batch_size: int
) -> Iterator[_Batch]:
    """Yield preprocessed batches; the next ones load in a thread while the model runs."""
    items = list(images.items())
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: list[Future[_Batch]] = []
        for chunk in chunks[:2]:
            pending.append(pool.submit(_load_batch, encoder, chunk, on_error))
        next_chunk = 2
        try:
            while pending:
                batch = pending.pop(0).result()
                if next_chunk < len(chunks):
                    pending.append(pool.submit(_load_batch, encoder, chunks[next_chunk], on_error))
                    next_chunk += 1
                yield batch
        finally:
            for future in pending:
                future.cancel()


def _encode_all(
    encoder: ImageEncoder,
    images: dict[str, Path],
    writer: _ArrayWriter,
    on_error: str,
    batch_size: int,
    progress: bool,
) -> dict[str, str]:
    failed: dict[str, str] = {}
    bar = tqdm(total=len(images), unit="img", desc=f"features ({encoder.name})", disable=not progress)
    with bar, torch.inference_mode():
        for batch in _batches(encoder, images, on_error, batch_size):
            failed.update(batch.failed)
            if batch.pixels is not None:
                out = encoder(batch.pixels.to(encoder.device))
                writer.append(batch.keys, out.pooled, out.grid)
            bar.update(len(batch.keys) + len(batch.failed))
    return failed


class _ArrayWriter:
    """Appends float16 rows to preallocated .npy memmaps; trims them at the end."""

    def __init__(self, directory: Path, capacity: int, encoder: ImageEncoder) -> None:
        self.directory = directory
        self.keys: list[str] = []
        self.pooled_shape: tuple[int, ...] = (capacity, encoder.pooled_dim)
        self.grid_shape: tuple[int, ...] = (capacity, encoder.num_positions, encoder.grid_dim)
        self._pooled = _create(directory / POOLED_FILE, self.pooled_shape)
        self._grid = _create(directory / GRID_FILE, self.grid_shape)

    @property
    def count(self) -> int:
        return len(self.keys)

    def append(self, keys: list[str], pooled: torch.Tensor, grid: torch.Tensor) -> None:
        start, stop = self.count, self.count + len(keys)
        pooled_np = _to_float16(pooled, (len(keys), *self.pooled_shape[1:]), "pooled")
        grid_np = _to_float16(grid, (len(keys), *self.grid_shape[1:]), "grid")
        self._pooled[start:stop] = pooled_np
        self._grid[start:stop] = grid_np
        self.keys.extend(keys)

    def finish(self) -> None:
        """Flush, drop unused rows (failed images), fsync."""
        rows = self.count
        for name, array in ((POOLED_FILE, self._pooled), (GRID_FILE, self._grid)):
            array.flush()
            if rows < array.shape[0]:
                path = self.directory / name
                trimmed = _create(path.with_suffix(".trim.npy"), (rows, *array.shape[1:]))
                trimmed[:] = array[:rows]
                trimmed.flush()
                del trimmed
                os.replace(path.with_suffix(".trim.npy"), path)
            _fsync(self.directory / name)
        self._pooled = self._grid = None  # type: ignore[assignment]
        self.pooled_shape = (rows, *self.pooled_shape[1:])
        self.grid_shape = (rows, *self.grid_shape[1:])


def _create(path: Path, shape: tuple[int, ...]) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=DTYPE, shape=shape)


def _to_float16(tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> np.ndarray:
    if tuple(tensor.shape) != shape:
        raise FeatureCacheError(f"encoder returned {what} of shape {tuple(tensor.shape)}, expected {shape}")
    array = tensor.detach().to("cpu", torch.float32).numpy().astype(DTYPE)
    if not np.isfinite(array).all():
        raise FeatureCacheError(f"encoder {what} features are not finite in float16")
    return array


def _load_array(path: Path, shape: list[int]) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise FeatureCacheError(f"unreadable feature array {path}: {exc}; {REBUILD_HINT}") from exc
    if list(array.shape) != list(shape) or array.dtype != DTYPE:
        raise FeatureCacheError(
            f"feature array {path} has shape {array.shape} {array.dtype}, "
            f"expected {tuple(shape)} {np.dtype(DTYPE).name}; {REBUILD_HINT}"
        )
    return array


def _as_index(rows: Rows) -> int | slice | np.ndarray:
    if isinstance(rows, (int, np.integer, slice)):
        return rows
    return np.asarray(rows, dtype=np.int64)


def _temporary_sibling(directory: Path) -> Path:
    """A fresh hidden directory beside `directory`, where a cache is written before it is renamed into place."""
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _check_replaceable(directory: Path) -> None:
    """Refuse to replace a directory that is neither empty nor a feature cache."""
    if directory.exists() and (
        not directory.is_dir()
        or (any(directory.iterdir()) and not (directory / META_FILE).is_file())
    ):
        raise FeatureCacheError(
            f"{directory} exists and is not a feature cache; refusing to overwrite it"
        )


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing any old cache there."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
