"""Training under bad conditions (RELIABILITY.md): non-finite losses and gradients, a NaN that reaches the weights,
a full disk while saving, and resuming or loading a checkpoint that another encoder or text space made."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffcap.checkpoint
import diffcap.train
from diffcap.checkpoint import CheckpointError, load_checkpoint, load_train_state, unprefixed
from diffcap.train import TrainingDiverged, train
from tiny_models import make_tiny_backbone, make_tiny_clip, tiny_setup  # noqa: F401 - tiny_setup is a fixture

LOSS_FN = "training_losses" if hasattr(diffcap.train, "training_losses") else "caption_losses"


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad * float("nan")


def _poison_losses(monkeypatch: pytest.MonkeyPatch, bad: dict[int, str]) -> list[int]:
    """Make loss call n (1-based) non-finite: bad[n] = "loss" (NaN loss) or "grad" (finite loss, NaN gradient)."""
    real = getattr(diffcap.train, LOSS_FN)
    calls: list[int] = []

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls.append(len(calls) + 1)
        how = bad.get(len(calls))
        if how == "loss":
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        elif how == "grad":
            losses = {**losses, "loss": _NanGradient.apply(losses["loss"])}
        return losses

    monkeypatch.setattr(diffcap.train, LOSS_FN, poisoned)
    return calls


def _record(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Capture the live optimizer (its parameters are the live weights) and the EMA copy of a training run."""
    seen: dict = {"optimizer_steps": 0}
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen["optimizer"] = self
        seen["optimizer_steps"] += 1
        return real_step(self, *args, **kwargs)

    import copy

    def deepcopy(module):
        seen["ema"] = copy.deepcopy(module)
        return seen["ema"]

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(diffcap.train, "copy", types.SimpleNamespace(deepcopy=deepcopy))
    return seen


def test_non_finite_steps_are_skipped_without_touching_the_weights(tiny_setup: dict, tmp_path: Path, monkeypatch,
                                                                    caplog) -> None:
    calls = _poison_losses(monkeypatch, {3: "loss", 4: "grad", 6: "loss"})
    seen = _record(monkeypatch)
    config = tiny_setup["config"](**{"train.max_steps": 5, "train.max_bad_steps": 3})
    with caplog.at_level(logging.WARNING, logger="diffcap"):
        ckpt = train(config, tmp_path / "run", progress=False)
    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(skipped) == 3 and "(2 in a row)" in skipped[1]  # 3 and 4 in a row, then 6 alone
    assert len(calls) == 8 and seen["optimizer_steps"] == 5  # 8 batches, 5 updates
    assert load_checkpoint(ckpt)[1]["step"] == 5


def test_consecutive_non_finite_steps_stop_the_run_with_weights_and_checkpoint_clean(tiny_setup: dict, tmp_path: Path,
                                                                                      monkeypatch) -> None:
    _poison_losses(monkeypatch, {n: "loss" for n in range(4, 100)})
    seen = _record(monkeypatch)
    config = tiny_setup["config"](**{"train.max_steps": 10, "train.max_bad_steps": 3})
    with pytest.raises(TrainingDiverged) as info:
        train(config, tmp_path / "run", progress=False)
    message = str(info.value)
    assert "3 steps in a row" in message and "train.max_bad_steps=3" in message and "(step 3) holds no NaN" in message
    ckpt = tmp_path / "run" / "checkpoint"
    meta, tensors = load_train_state(ckpt)
    assert meta["step"] == 3 and seen["optimizer_steps"] == 3
    # the live weights and the EMA are exactly those of the last good step: the bad steps changed nothing
    live = [p.detach() for group in seen["optimizer"].param_groups for p in group["params"]]
    named = list(seen["ema"].named_parameters())  # same names and order as the trained module
    no_decay = [n for n, p in named if p.ndim < 2 or "norm" in n]
    names = [n for n, _ in named if n not in no_decay] + no_decay  # the optimizer's two groups, in order
    saved = unprefixed("model", tensors)
    assert len(names) == len(live) and all(torch.equal(p, saved[n]) for n, p in zip(names, live))
    ema = unprefixed("denoiser", load_file(str(ckpt / "model.safetensors")))
    assert all(torch.equal(p, ema[n]) for n, p in seen["ema"].named_parameters())


def test_a_nan_in_the_weights_is_never_written_to_a_checkpoint(tiny_setup: dict, tmp_path: Path, monkeypatch) -> None:
    real_step = torch.optim.AdamW.step
    count = {"n": 0}

    def poisoning_step(self, *args, **kwargs):  # step 3 writes a NaN into a weight (a bug the loss cannot see yet)
        result = real_step(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    config = tiny_setup["config"](**{"train.max_steps": 6})
    with pytest.raises(TrainingDiverged, match=r"refusing to write a checkpoint at step 3: non-finite values in .*"
                                               r"still holds step 2"):
        train(config, tmp_path / "run", progress=False)
    _, meta, tensors = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert meta["step"] == 2 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_disk_full_while_saving_stops_training_with_one_clear_line(tiny_setup: dict, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    from diffcap.cli import main

    real_save = diffcap.checkpoint.save_file
    calls = {"n": 0}

    def filling_save(tensors, filename, *args, **kwargs):  # the second checkpoint finds the disk full
        calls["n"] += 1
        if calls["n"] == 3:
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(diffcap.checkpoint, "save_file", filling_save)
    run = tmp_path / "run"
    code = main(["train", "tiny", *tiny_setup["overrides"](**{"train.max_steps": 4}), "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = [line for line in err.splitlines() if line.startswith("error:")][-1]
    assert "No space left on device" in line and "previous checkpoint there is intact" in line
    assert load_train_state(run / "checkpoint")[0]["step"] == 1
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []

    monkeypatch.setattr(diffcap.checkpoint, "save_file", real_save)  # space freed: resume finishes the run
    assert main(["train", "tiny", *tiny_setup["overrides"](**{"train.max_steps": 4}), "--run-dir", str(run),
                 "--resume"]) == 0
    assert load_checkpoint(run / "checkpoint")[1]["step"] == 4


@pytest.fixture(scope="module")
def tiny_run(tiny_setup: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step run with its own copies of the tiny backbone and encoder (the tests below swap their weights)."""
    base = tmp_path_factory.mktemp("own-models")
    backbone, clip = base / "backbone", base / "clip"
    shutil.copytree(tiny_setup["backbone"], backbone)
    shutil.copytree(tiny_setup["clip"], clip)
    config = tiny_setup["config"](**{"train.max_steps": 2, "text.backbone": str(backbone),
                                     "encoder.name": f"clip:{clip}", "data.cache_dir": str(base / "features")})
    train(config, base / "run", progress=False)
    return base


def _resume_config(tiny_setup: dict, base: Path, **extra):
    return tiny_setup["config"](**{"train.max_steps": 3, "text.backbone": str(base / "backbone"),
                                   "encoder.name": f"clip:{base / 'clip'}", "data.cache_dir": str(base / "features"),
                                   **extra})


def test_resume_refuses_a_checkpoint_of_another_encoder(tiny_setup: dict, tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    other = make_tiny_clip(tmp_path / "other-clip")
    torch.manual_seed(1)
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(other)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(other)
    config = _resume_config(tiny_setup, tiny_run, **{"encoder.name": f"clip:{other}",
                                                     "data.cache_dir": str(tmp_path / "features")})
    with pytest.raises(CheckpointError, match="another image encoder or preprocessing.*weights_sha256"):
        train(config, run, resume=True, progress=False)
    assert load_train_state(run / "checkpoint")[0]["step"] == 2  # untouched


def test_resume_refuses_a_checkpoint_of_another_text_space(tiny_setup: dict, tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    other = tmp_path / "other-backbone"
    shutil.copytree(tiny_run / "backbone", other)
    from transformers import BertModel

    model = BertModel.from_pretrained(other)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(2.0)
    model.save_pretrained(other)
    with pytest.raises(CheckpointError, match="another text space"):
        train(_resume_config(tiny_setup, tiny_run, **{"text.backbone": str(other)}), run, resume=True, progress=False)
    # same backbone, but other training captions: another rounding vocabulary
    other_data = tmp_path / "data"
    shutil.copytree(tiny_setup["jsonl"].parent, other_data)
    rows = [json.loads(line) for line in (other_data / "captions.jsonl").read_text().splitlines()]
    (other_data / "captions.jsonl").write_text("".join(
        json.dumps({**row, "caption": [c + " zebra" for c in row["caption"]] if isinstance(row["caption"], list)
                    else row["caption"] + " zebra"}) + "\n" for row in rows))
    with pytest.raises(CheckpointError, match="another text space.*vocabulary built from other training captions"):
        train(_resume_config(tiny_setup, tiny_run, **{"data.root": str(other_data / "captions.jsonl")}), run,
              resume=True, progress=False)
    with pytest.raises(CheckpointError, match="does not fit this config's model"):  # another model shape
        train(_resume_config(tiny_setup, tiny_run, **{"model.grid_pool": 3}), run, resume=True, progress=False)
    assert load_train_state(run / "checkpoint")[0]["step"] == 2


def test_captioning_refuses_a_checkpoint_whose_encoder_or_backbone_changed(tiny_run: Path, tmp_path: Path) -> None:
    from diffcap.captioner import Captioner
    from diffcap.text.space import TextSpaceError, load_backbone
    from transformers import BertModel, CLIPVisionModelWithProjection

    ckpt = tiny_run / "run" / "checkpoint"
    assert Captioner.from_pretrained(ckpt)  # as trained: fine
    for name in ("clip", "backbone"):  # this test swaps their weights: the tests above ran (file order)
        shutil.copytree(tiny_run / name, tmp_path / name)
    clip = CLIPVisionModelWithProjection.from_pretrained(tiny_run / "clip")
    with torch.no_grad():
        next(clip.parameters()).add_(0.5)
    clip.save_pretrained(tiny_run / "clip")  # the encoder directory now holds other weights
    with pytest.raises(CheckpointError, match="different image encoder or preprocessing"):
        Captioner.from_pretrained(ckpt)
    backbone = BertModel.from_pretrained(tiny_run / "backbone")
    with torch.no_grad():
        backbone.embeddings.word_embeddings.weight.add_(0.5)
    backbone.save_pretrained(tiny_run / "backbone")
    load_backbone.cache_clear()
    try:
        with pytest.raises(TextSpaceError, match="different word-embedding table"):
            Captioner.from_pretrained(ckpt)
    finally:
        for name in ("clip", "backbone"):
            shutil.rmtree(tiny_run / name)
            shutil.copytree(tmp_path / name, tiny_run / name)
        load_backbone.cache_clear()
