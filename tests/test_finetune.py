"""train.init_from: fine-tuning starts from a checkpoint's weights and vocabulary, and refuses one that does not
fit the config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from diffcap.checkpoint import CheckpointError
from diffcap.pipeline import load_model
from diffcap.train import train


def _other_captions(shapes_jsonl: Path, out: Path) -> Path:
    """The same images with captions that use a word the checkpoint's vocabulary lacks."""
    rows = [json.loads(line) for line in shapes_jsonl.read_text().splitlines()]
    for r in rows:
        r["caption"] = r["caption"].replace("a ", "a zebra ", 1)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_fine_tuning_starts_from_the_checkpoint(tmp_path, shapes_jsonl, tiny_config, tiny_checkpoint, caplog) -> None:
    base, _ = load_model(tiny_checkpoint)
    jsonl = _other_captions(shapes_jsonl, tmp_path / "zebra.jsonl")
    # lr ~0: after one step the averaged weights are still the checkpoint's
    config = tiny_config(jsonl, data__image_root=str(shapes_jsonl.parent), train__init_from=str(tiny_checkpoint),
                         train__max_steps=1, train__lr=1e-12, train__warmup_steps=0)
    with caplog.at_level(logging.WARNING, logger="diffcap"):
        tuned, _ = load_model(train(config, tmp_path / "tuned", progress=False))
    # its vocabulary, not one built from the "zebra" captions
    assert torch.equal(tuned.space.vocab_ids, base.space.vocab_ids)
    assert "outside the vocabulary" in caplog.text
    for name, value in base.denoiser.state_dict().items():
        torch.testing.assert_close(tuned.denoiser.state_dict()[name].float(), value.float(), atol=1e-6, rtol=0)

    # without init_from the same config trains from the backbone: other weights, its own vocabulary
    config.train.init_from = ""
    fresh, _ = load_model(train(config, tmp_path / "fresh", progress=False))
    assert fresh.space.vocab_size == base.space.vocab_size + 1  # "zebra"
    assert not torch.allclose(fresh.denoiser.state_dict()["out_proj.weight"].float(),
                              base.denoiser.state_dict()["out_proj.weight"].float())


@pytest.mark.parametrize(("override", "named"), [({"model__layers": 2}, "layers"),
                                                 ({"text__latent_scale": 0.5}, "text.latent_scale"),
                                                 ({"model__kind": "autoregressive"}, "model.kind")])
def test_fine_tuning_refuses_a_checkpoint_of_another_shape(tmp_path, shapes_jsonl, tiny_config, tiny_checkpoint,
                                                           override, named) -> None:
    config = tiny_config(shapes_jsonl, train__init_from=str(tiny_checkpoint), train__max_steps=1, **override)
    with pytest.raises(CheckpointError, match=named):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_fine_tuning_from_a_missing_checkpoint_says_so(tmp_path, shapes_jsonl, tiny_config) -> None:
    config = tiny_config(shapes_jsonl, train__init_from=str(tmp_path / "nowhere"), train__max_steps=1)
    with pytest.raises(CheckpointError, match="nowhere"):
        train(config, tmp_path / "run", progress=False)


def test_a_fine_tuning_run_resumes_in_the_checkpoints_vocabulary(tmp_path, shapes_jsonl, tiny_config,
                                                                 tiny_checkpoint) -> None:
    jsonl = _other_captions(shapes_jsonl, tmp_path / "zebra.jsonl")
    config = tiny_config(jsonl, data__image_root=str(shapes_jsonl.parent), train__init_from=str(tiny_checkpoint),
                         train__max_steps=2)
    train(config, tmp_path / "run", progress=False)
    config.train.max_steps = 3
    resumed, _ = load_model(train(config, tmp_path / "run", resume=True, progress=False))
    assert json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())["step"] == 3
    assert torch.equal(resumed.space.vocab_ids, load_model(tiny_checkpoint)[0].space.vocab_ids)
