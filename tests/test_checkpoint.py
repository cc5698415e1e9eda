"""Tests for diffcap.checkpoint: round trip, atomic replacement and refusing anything but safetensors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import diffcap.checkpoint as ckpt
from diffcap.checkpoint import (
    FORMAT_VERSION,
    MODEL_FILE,
    CheckpointError,
    load_checkpoint,
    load_train_state,
    prefixed,
    save_checkpoint,
    unprefixed,
)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "denoiser.w": torch.randn(3, 4, generator=g),
        "denoiser.b": torch.randn(4, generator=g).to(torch.bfloat16),
        "text.vocab_ids": torch.arange(7, dtype=torch.long) * (seed + 1),
        "text.scalar": torch.tensor(float(seed)),
    }


def _save(directory: Path, seed: int, **kwargs) -> Path:
    return save_checkpoint(
        directory,
        config_json=json.dumps({"train": {"lr": 0.001 * (seed + 1)}}),
        meta={"step": seed, "text": {"fingerprint": f"fp{seed}"}},
        tensors=_tensors(seed),
        **kwargs,
    )


def _assert_checkpoint(directory: Path, seed: int) -> None:
    config, meta, tensors = load_checkpoint(directory)
    assert config == {"train": {"lr": 0.001 * (seed + 1)}}
    assert meta == {"format_version": FORMAT_VERSION, "step": seed, "text": {"fingerprint": f"fp{seed}"}}
    expected = _tensors(seed)
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and tensors[key].shape == value.shape
        assert torch.equal(tensors[key], value), key


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _forbid_unpickling(patcher) -> None:
    """Any attempt to unpickle (pickle or torch.load) fails the test loudly."""

    def boom(*args, **kwargs):
        raise AssertionError("checkpoint loading tried to unpickle")

    class Unpickler:
        def __init__(self, *args, **kwargs):
            boom()

    patcher.setattr(pickle, "loads", boom)
    patcher.setattr(pickle, "load", boom)
    patcher.setattr(pickle, "Unpickler", Unpickler)
    patcher.setattr(torch, "load", boom)


@pytest.fixture
def no_unpickling(monkeypatch):
    _forbid_unpickling(monkeypatch)


def test_round_trip(tmp_path) -> None:
    directory = _save(tmp_path / "ckpt", 0)
    assert directory == tmp_path / "ckpt"
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "meta.json", MODEL_FILE]
    _assert_checkpoint(directory, 0)
    assert _leftovers(tmp_path) == []


def test_checkpoint_files_get_the_users_usual_permissions(tmp_path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        directory = _save(tmp_path / "ckpt", 0)
    finally:
        os.umask(old)
    for f in directory.iterdir():  # safetensors alone would leave model.safetensors 0600 (unreadable to a team)
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_round_trip_with_train_state(tmp_path) -> None:
    train = {"opt.exp_avg": torch.randn(5, 2), "step": torch.tensor(12)}
    _save(tmp_path / "ckpt", 1, train_tensors=train, train_meta={"step": 12, "rng": [1, 2, 3]})
    _assert_checkpoint(tmp_path / "ckpt", 1)
    meta, tensors = load_train_state(tmp_path / "ckpt")
    assert meta == {"step": 12, "rng": [1, 2, 3]}
    assert set(tensors) == set(train) and all(torch.equal(tensors[k], train[k]) for k in train)


def test_save_non_contiguous_and_grad_tensors(tmp_path) -> None:
    w = torch.randn(4, 3, requires_grad=True)
    save_checkpoint(tmp_path / "c", config_json="{}", meta={}, tensors={"t": w.T, "w": w})
    _, _, tensors = load_checkpoint(tmp_path / "c")
    assert torch.equal(tensors["t"], w.detach().T) and torch.equal(tensors["w"], w.detach())


def test_overwrite_replaces_completely(tmp_path) -> None:
    _save(tmp_path / "ckpt", 0, train_tensors={"x": torch.zeros(2)}, train_meta={"step": 0})
    _save(tmp_path / "ckpt", 1)  # no train state this time
    _assert_checkpoint(tmp_path / "ckpt", 1)
    assert not (tmp_path / "ckpt" / "train_state.safetensors").exists()  # not a mixture of old and new
    assert _leftovers(tmp_path) == []


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    _save(tmp_path / "ckpt", 0)
    calls = []

    def failing_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path / "ckpt", 1, train_tensors={"x": torch.ones(3)}, train_meta={"step": 1})
    assert len(calls) == 2
    assert all(Path(c).parent != tmp_path / "ckpt" for c in calls)  # never written in place
    _assert_checkpoint(tmp_path / "ckpt", 0)
    assert not (tmp_path / "ckpt" / "train_state.safetensors").exists()
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch) -> None:
    def failing_save_file(*args, **kwargs):
        raise KeyboardInterrupt  # even a BaseException cleans up

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / "ckpt", 0)
    assert list(tmp_path.iterdir()) == []


def test_failed_json_write_keeps_previous(tmp_path) -> None:
    _save(tmp_path / "ckpt", 0)
    with pytest.raises(TypeError):  # meta is not JSON-serialisable: fails after the tensors were written
        save_checkpoint(tmp_path / "ckpt", config_json="{}", meta={"bad": object()}, tensors=_tensors(1))
    _assert_checkpoint(tmp_path / "ckpt", 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_directory(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "file")


@pytest.mark.parametrize("missing", ["meta.json", "config.json", MODEL_FILE])
def test_missing_file(tmp_path, missing: str, no_unpickling) -> None:
    directory = _save(tmp_path / "ckpt", 0)
    (directory / missing).unlink()
    with pytest.raises(CheckpointError, match=f"not a diffcap checkpoint: {missing} is missing"):
        load_checkpoint(directory)


@pytest.mark.parametrize("name", ["meta.json", "config.json"])
@pytest.mark.parametrize("content", [b"{broken", b"[1, 2]", b"\xff\xfe\x00garbage"])
def test_corrupt_json(tmp_path, name: str, content: bytes) -> None:
    directory = _save(tmp_path / "ckpt", 0)
    (directory / name).write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(directory)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version(tmp_path, version) -> None:
    directory = _save(tmp_path / "ckpt", 0)
    meta = json.loads((directory / "meta.json").read_text())
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format .* is not supported"):
        load_checkpoint(directory)


@pytest.mark.parametrize(
    "corrupt",
    [
        b"",
        b"\x00" * 4,
        b"this is definitely not a safetensors file" * 10,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header",
    ],
)
def test_corrupt_model_file(tmp_path, corrupt: bytes, no_unpickling) -> None:
    directory = _save(tmp_path / "ckpt", 0)
    (directory / MODEL_FILE).write_bytes(corrupt)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(directory)


def test_truncated_model_file(tmp_path, no_unpickling) -> None:
    directory = _save(tmp_path / "ckpt", 0)
    data = (directory / MODEL_FILE).read_bytes()
    (directory / MODEL_FILE).write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(directory)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_renamed_is_refused_without_unpickling(tmp_path, monkeypatch, legacy: bool) -> None:
    directory = _save(tmp_path / "ckpt", 0)
    torch.save({"denoiser.w": torch.randn(3, 4)}, directory / MODEL_FILE, _use_new_zipfile_serialization=not legacy)
    with monkeypatch.context() as m:
        _forbid_unpickling(m)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(directory)
    message = str(info.value)
    assert MODEL_FILE in message and "never loads pickled checkpoints" in message


def test_model_file_is_a_directory(tmp_path) -> None:
    directory = _save(tmp_path / "ckpt", 0)
    (directory / MODEL_FILE).unlink()
    (directory / MODEL_FILE).mkdir()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(directory)


def test_train_state_missing(tmp_path) -> None:
    directory = _save(tmp_path / "ckpt", 0)
    with pytest.raises(CheckpointError, match="train_state.json is missing"):
        load_train_state(directory)


def test_prefixed_round_trip() -> None:
    state = {"a": torch.zeros(1), "b.c": torch.ones(2)}
    both = {**prefixed("denoiser", state), **prefixed("text", {"a": torch.full((1,), 5.0)})}
    assert set(both) == {"denoiser.a", "denoiser.b.c", "text.a"}
    back = unprefixed("denoiser", both)
    assert set(back) == {"a", "b.c"} and torch.equal(back["b.c"], state["b.c"])
    assert unprefixed("den", both) == {}  # a prefix matches whole name components only


# -- crashes and full disks (RELIABILITY.md) ---------------------------------------------------------------------


def _save_and_die_at(directory: Path, n: int) -> int:
    """In a forked child, save checkpoint 1 over checkpoint 0 and die (as if SIGKILLed: no cleanup, no
    `finally`) just before the n-th filesystem operation of the save. Returns the child's exit status."""
    import os
    import shutil

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            calls = {"n": 0}

            def dying(fn):
                def wrapper(*args, **kwargs):
                    calls["n"] += 1
                    if calls["n"] == n:
                        os._exit(9)
                    return fn(*args, **kwargs)
                return wrapper

            os.replace, os.fsync, shutil.rmtree = dying(os.replace), dying(os.fsync), dying(shutil.rmtree)
            ckpt.save_file = dying(ckpt.save_file)
            Path.mkdir, Path.write_text = dying(Path.mkdir), dying(Path.write_text)
            _save(directory, 1, train_tensors={"x": torch.ones(3)}, train_meta={"step": 1})
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_kill_at_every_step_of_a_save_leaves_a_complete_checkpoint(tmp_path) -> None:
    """Die before each filesystem operation of a save in turn: the checkpoint always loads, as the old one or
    the new one (never a mixture), and the next save cleans up what the dead one left."""
    outcomes = []
    for n in range(1, 100):
        directory = tmp_path / f"run{n}" / "ckpt"
        _save(directory, 0, train_tensors={"x": torch.zeros(3)}, train_meta={"step": 0})
        code = _save_and_die_at(directory, n)
        assert code in (0, 9), code
        _, meta, _ = load_checkpoint(directory)  # recovers a swap the kill interrupted
        seed = meta["step"]
        _assert_checkpoint(directory, seed)
        assert load_train_state(directory)[0] == {"step": seed}
        outcomes.append(seed)
        _save(directory, 2)
        _assert_checkpoint(directory, 2)
        assert _leftovers(directory.parent) == []
        if code == 0:
            break
    assert code == 0 and n > 8  # every operation of a complete save was a kill point once
    assert outcomes[0] == 0 and outcomes[-1] == 1 and 0 in outcomes[:-1]


def test_kill_between_the_two_renames_is_recovered(tmp_path) -> None:
    directory = tmp_path / "ckpt"
    _save(directory, 0)
    aside = tmp_path / ".ckpt.old-deadbeef"
    directory.rename(aside)  # the state a kill after the first rename leaves
    (tmp_path / ".ckpt.tmp-cafecafe").mkdir()  # and a new one that never made it
    _assert_checkpoint(directory, 0)
    assert directory.is_dir() and not aside.exists()
    _save(directory, 1)
    assert _leftovers(tmp_path) == []


def test_disk_full_keeps_previous_checkpoint_with_a_clear_message(tmp_path, monkeypatch) -> None:
    import errno

    _save(tmp_path / "ckpt", 0, train_tensors={"x": torch.zeros(3)}, train_meta={"step": 0})

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 10)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        _save(tmp_path / "ckpt", 1, train_tensors={"x": torch.ones(3)}, train_meta={"step": 1})
    message = str(info.value)
    assert "No space left on device" in message and "previous checkpoint there is intact" in message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, CheckpointError)
    _assert_checkpoint(tmp_path / "ckpt", 0)
    assert load_train_state(tmp_path / "ckpt")[0] == {"step": 0}
    assert _leftovers(tmp_path) == []


def test_export_writes_a_small_fp16_checkpoint_that_captions_alike(tiny_checkpoint: Path, shapes_jsonl: Path,
                                                                   tmp_path: Path) -> None:
    from diffcap.captioner import Captioner
    from diffcap.pipeline import export_model

    out = export_model(tiny_checkpoint, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    assert (out / "model.safetensors").stat().st_size < 0.6 * (tiny_checkpoint / "model.safetensors").stat().st_size
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if k.startswith("denoiser."))
    assert tensors["text.mean"].dtype == torch.float32  # the latent statistics stay exact
    images = sorted((shapes_jsonl.parent / "images").glob("dev_*.png"))
    full, half = Captioner.from_pretrained(tiny_checkpoint), Captioner.from_pretrained(out)
    assert next(half.model.denoiser.parameters()).dtype == torch.float32  # computed in fp32 after loading
    assert half.caption(images, seed=1) == full.caption(images, seed=1)


def test_no_user_file_is_ever_unpickled() -> None:
    """Source audit: every torch.load names weights_only=True, and nothing calls pickle directly."""
    import re

    source = Path(ckpt.__file__).parent
    offenders = []
    for path in sorted(source.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.name}: {match.group(0)}")
        offenders += [f"{path.name}: pickle" for _ in re.finditer(r"\bpickle\.(load|loads|Unpickler)\b", text)]
    assert not offenders, offenders


def test_text_files_are_written_whole_with_the_umasks_permissions(tmp_path) -> None:
    from diffcap.checkpoint import write_text_atomic

    path = write_text_atomic(tmp_path / "sub" / "out.json", "{}")
    assert path.read_text() == "{}" and list(path.parent.iterdir()) == [path]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
