"""Length-conditioned sampling (`sample.length="predicted"`): the predictor, the fixed-length rounding, the
pipeline and the `fit-length` command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffcap.models.length import LengthPredictor, caption_lengths
from diffcap.text.space import TextSpace

CAPTIONS = ["a dog runs on the grass", "two men play football in the park", "a girl"]


@pytest.fixture(scope="module")
def space() -> TextSpace:
    return TextSpace.from_backbone("minilm", 10, 0.25, captions=CAPTIONS, restrict_vocab=True)


def test_predictor_learns_length_from_the_image() -> None:
    # images whose first feature is high have 6-word captions, the others 2-word ones (3 captions each)
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(40, 8, generator=g)
    long_ = pooled[:, 0] > 0
    owners = torch.arange(40).repeat_interleave(3)
    lengths = torch.where(long_, 6, 2).repeat_interleave(3)
    predictor = LengthPredictor.fit(pooled, lengths, owners, max_length=10, weight_decay=1e-3)
    test = torch.randn(20, 8, generator=g)
    test[:, 0] += test[:, 0].sign() * 0.5  # clear of the boundary
    assert predictor.predict(test).tolist() == torch.where(test[:, 0] > 0, 6, 2).tolist()
    # stored and rebuilt: the same predictions
    again = LengthPredictor.from_tensors(predictor.tensors())
    assert again is not None and torch.equal(again.predict(test), predictor.predict(test))
    assert LengthPredictor.from_tensors({}) is None


def test_prediction_stays_in_range() -> None:
    predictor = LengthPredictor(torch.zeros(4), torch.ones(4), torch.zeros(10, 4), torch.full((10,), -5.0))
    predictor.bias[0] = 5.0  # length 0 (an empty caption) is never predicted, whatever the weights say
    assert int(predictor.predict(torch.zeros(3, 4)).min()) >= 1
    with pytest.raises(ValueError, match="do not fit"):
        LengthPredictor(torch.zeros(4), torch.ones(4), torch.zeros(10, 5), torch.zeros(10))


def test_caption_lengths(space) -> None:
    ids = space.encode(CAPTIONS)
    pieces = [len(space.tokenizer.tokenize(c)) for c in CAPTIONS]
    assert caption_lengths(ids, space.sep_index).tolist() == pieces


def test_round_with_lengths_places_sep_and_pad(space) -> None:
    latents = space.embed(space.encode(["a girl"] * 3))  # the model "wants" 2 word pieces
    lengths = torch.tensor([1, 2, 5])
    ids = space.round(latents, lengths=lengths)
    for row, n in zip(ids.tolist(), lengths.tolist()):
        assert space.sep_index not in row[:n] and space.pad_index not in row[:n]
        assert row[n] == space.sep_index and set(row[n + 1:]) == {space.pad_index}
    assert space.decode(ids[1:2]) == ["a girl"]  # where the length agrees, nothing changes
    assert space.round(latents, lengths=None).tolist()[0] == space.encode(["a girl"])[0].tolist()
    with pytest.raises(ValueError, match="1 .. 9"):
        space.round(latents, lengths=torch.tensor([0, 2, 3]))
    # without clamping, only the ends are written
    fixed = space.fix_length(latents, lengths)
    assert torch.equal(space.round(fixed[:, :1]), space.round(latents[:, :1]))
    assert space.round(fixed).tolist()[0][1] == space.sep_index


def test_training_fits_a_predictor_and_sampling_uses_it(tiny_checkpoint: Path) -> None:
    from diffcap.models.denoiser import ImageFeatures
    from diffcap.pipeline import generate, load_model

    model, _ = load_model(tiny_checkpoint)
    assert model.lengths is not None and model.lengths.max_length == model.space.max_length
    pooled_dim, grid_dim = model.denoiser.shape.pooled_dim, model.denoiser.shape.grid_dim
    g = torch.Generator().manual_seed(1)
    image = ImageFeatures(torch.randn(4, pooled_dim, generator=g), torch.randn(4, 4, grid_dim, generator=g))
    model.lengths.weight.zero_()  # make the predictor say 5 word pieces for every image
    model.lengths.bias[:] = -50.0
    model.lengths.bias[5] = 50.0
    assert model.lengths.predict(image.pooled).tolist() == [5, 5, 5, 5]
    seen = []
    round_ = model.space.round
    model.space.round = lambda latents, *a, **k: seen.append(round_(latents, *a, **k)) or seen[-1]
    for clamp in (True, False):
        seen.clear()
        generate(model, image, steps=3, length="predicted", collapse_repeats=False, clamp=clamp)
        ids = seen[-1]  # the final rounding: 5 word pieces, then [SEP], then [PAD]
        assert (ids[:, 5] == model.space.sep_index).all() and (ids[:, 6:] == model.space.pad_index).all()
        assert not ((ids[:, :5] == model.space.sep_index) | (ids[:, :5] == model.space.pad_index)).any()
    del model.space.round
    with pytest.raises(ValueError, match="free or predicted"):
        generate(model, image, steps=2, length="short")
    with pytest.raises(ValueError, match="needs an image"):
        generate(model, None, batch=2, steps=2, length="predicted")
    model.lengths = None
    with pytest.raises(ValueError, match="no length predictor"):
        generate(model, image, steps=2, length="predicted")


def test_fit_length_command(tiny_checkpoint: Path, shapes_jsonl: Path, tmp_path: Path, capsys) -> None:
    from diffcap.cli import main
    from diffcap.checkpoint import load_checkpoint, load_train_state
    from diffcap.pipeline import load_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    _, _, tensors = load_checkpoint(ckpt)
    before = {k: v for k, v in tensors.items() if not k.startswith("length.")}
    train_meta, _ = load_train_state(ckpt)
    # a checkpoint from before the predictor existed
    from diffcap.checkpoint import save_checkpoint
    import json

    config, meta, _ = load_checkpoint(ckpt)
    save_checkpoint(ckpt, config_json=json.dumps(config), meta={k: v for k, v in meta.items() if k != "format_version"},
                    tensors=before, train_tensors=load_train_state(ckpt)[1], train_meta=train_meta)
    assert load_model(ckpt)[0].lengths is None
    cache = tmp_path / "cache"
    assert main(["fit-length", str(ckpt), "--dataset", "jsonl", "--root", str(shapes_jsonl),
                 "--cache-dir", str(cache)]) == 0
    assert "fitted a length predictor on 8 train images" in capsys.readouterr().out
    model, _ = load_model(ckpt)
    assert model.lengths is not None
    _, _, after = load_checkpoint(ckpt)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the weights untouched
    assert load_train_state(ckpt)[0] == train_meta  # and the run still resumes from it
    # never on images the model was not trained on: that would fit the scored split
    assert main(["fit-length", str(ckpt), "--dataset", "jsonl", "--root", str(shapes_jsonl), "--split", "dev",
                 "--cache-dir", str(cache)]) != 0
    assert "4 of the 4 dev images were not training images" in capsys.readouterr().err
    assert torch.equal(load_checkpoint(ckpt)[2]["length.weight"], after["length.weight"])  # nothing written


def test_config_refuses_predicted_length_for_autoregressive() -> None:
    from diffcap.config import ConfigError, load_config

    assert load_config("default", ["sample.length=predicted"]).sample.length == "predicted"
    with pytest.raises(ConfigError, match="sample.length"):
        load_config("autoregressive", ["sample.length=predicted"])
