"""Checkpoints: a directory of safetensors files and JSON, written atomically. Nothing is ever pickled.

Layout of a checkpoint directory:
    config.json           the resolved Config the model is rebuilt from
    meta.json             format version, step, denoiser shape, text-space fingerprint, encoder identity
    model.safetensors     weights used for captioning (the EMA weights) + text-space buffers
    train_state.safetensors, train_state.json   (optional) raw weights, optimizer moments, RNG, step — for --resume

A save writes a sibling temporary directory, fsyncs it and swaps it in with two renames (old -> .NAME.old-*,
new -> NAME), so a crash at any instant leaves either the old or the new checkpoint complete, never a mixture.
A crash between the two renames leaves the old checkpoint complete under .NAME.old-*: every load and the next
save move it back first (`recover`). A save that fails (disk full, ...) raises CheckpointWriteError and leaves
the previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, foreign or unreadable; the message says which and why."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (e.g. disk full); the previous checkpoint, if any, is untouched."""


def _siblings(directory: Path, kind: str) -> list[Path]:
    """Leftovers of interrupted saves of `directory` (kind "tmp" or "old"), oldest first."""
    found = [p for p in directory.parent.glob(f".{directory.name}.{kind}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover(directory: Path) -> Path:
    """Undo a swap that a crash interrupted: if `directory` is missing but its previous version was moved
    aside (.NAME.old-*), move that back. Returns the directory to read (the moved-aside one if the move back
    is impossible, e.g. on a read-only filesystem)."""
    directory = Path(directory)
    if directory.exists() or not directory.parent.is_dir():
        return directory
    olds = _siblings(directory, "old")
    if not olds:
        return directory
    try:
        os.replace(olds[-1], directory)
    except OSError:
        return olds[-1]
    _fsync_dir(directory.parent)
    return directory


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_mode() -> int:
    """0o666 minus the process's umask: the permissions a plain `open(path, "w")` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a text file so that a kill leaves the old file or the new one, never half of one; with the
    permissions a plain `open(path, "w")` would give (a temporary file would be 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # UTF-8 whatever the locale; surrogateescape writes file names that were not UTF-8 back as their bytes
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False,
                                     encoding="utf-8", errors="surrogateescape", newline="") as f:
        try:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            os.unlink(f.name)
            raise
    os.chmod(f.name, _file_mode())
    os.replace(f.name, path)
    return path


def save_checkpoint(
    directory: Path,
    *,
    config_json: str,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    train_tensors: dict[str, torch.Tensor] | None = None,
    train_meta: dict[str, Any] | None = None,
) -> Path:
    directory = Path(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        recover(directory)
        for stale in _siblings(directory, "tmp") + _siblings(directory, "old"):  # left by killed saves
            shutil.rmtree(stale, ignore_errors=True)
        tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise _write_error(directory, exc) from exc
    try:
        files = {MODEL_FILE: tensors}
        if train_tensors is not None:
            files["train_state.safetensors"] = train_tensors
        for name, group in files.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / name))
        texts = {"config.json": config_json, "meta.json": json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2)}
        if train_meta is not None:
            texts["train_state.json"] = json.dumps(train_meta)
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        mode = _file_mode()
        for f in tmp.iterdir():
            os.chmod(f, mode)  # safetensors creates its files 0600: make them as readable as any file the user writes
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(directory)  # the old one was moved aside but the new one not moved in: put it back
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise _write_error(directory, exc) from exc
        raise
    return directory


def _write_error(directory: Path, exc: OSError) -> CheckpointWriteError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    kept = "the previous checkpoint there is intact" if directory.is_dir() else "no checkpoint was written"
    error = CheckpointWriteError(f"could not write checkpoint {directory}: {reason} ({exc}); {kept}. "
                                 "Free disk space (or choose another run dir) and resume")
    error.errno = exc.errno
    return error


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path.parent} is not a diffcap checkpoint: {path.name} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupt: expected a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} is not a diffcap checkpoint: {path.name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); diffcap never loads pickled checkpoints"
        ) from exc


def load_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, meta, model tensors) of a checkpoint directory."""
    directory = recover(Path(directory))
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist or is not a directory")
    meta = _read_json(directory / "meta.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    return _read_json(directory / "config.json"), meta, _read_tensors(directory / MODEL_FILE)


def load_train_state(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    directory = recover(Path(directory))
    return _read_json(directory / "train_state.json"), _read_tensors(directory / "train_state.safetensors")


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = prefix + "."
    return {k[len(start):]: v for k, v in state.items() if k.startswith(start)}
