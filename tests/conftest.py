"""Shared test setup: never touch the network or the model hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------------------------------------
# End-to-end fixtures (test_end_to_end.py, test_cli.py): a tiny synthetic dataset and one tiny trained checkpoint

import json  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

#: Overrides of the "tiny" preset that make a training run take seconds (the checkpoint is not meant to be good).
FAST_TINY = {"text.max_length": 12, "model.layers": 1, "train.batch_size": 8, "train.warmup_steps": 5,
             "train.max_steps": 20, "train.save_every": 1000, "train.log_every": 5}


def _write_caption_dataset(root: Path, rows: list[tuple[str, str | list[str], str]],
                           draw: Callable[[str], "object"]) -> Path:
    """Write ``root/captions.jsonl`` from (image name, caption(s), split) rows, drawing each new image with
    ``draw(name) -> PIL image``; return the jsonl path."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, caption, split in rows:
        if not (root / name).exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            draw(name).save(root / name)
        lines.append(json.dumps({"image": name, "caption": caption, "split": split}))
    path = root / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_test_only_flickr8k(root: Path, images: list[Path], first_id: int = 1000) -> list[str]:
    """What an independent evaluator has: ``images`` saved as Flickr8k JPEGs under ``root/Flickr8k_Dataset`` with
    ``Flickr8k.token.txt`` (5 captions each) and ``Flickr_8k.testImages.txt``, nothing else; returns the names."""
    from PIL import Image

    (root / "Flickr8k_Dataset").mkdir(parents=True)
    tokens, names = [], []
    for i, src in enumerate(images):
        name = f"{first_id + i}_test.jpg"
        Image.open(src).convert("RGB").save(root / "Flickr8k_Dataset" / name)
        names.append(name)
        tokens += [f"{name}#{k}\ta picture on a background number {k}" for k in range(5)]
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    (root / "Flickr_8k.testImages.txt").write_text("\n".join(names) + "\n")
    return names


@pytest.fixture(scope="session")
def write_caption_dataset() -> Callable[..., Path]:
    """``write_caption_dataset(root, [(image name, caption or captions, split), ...], draw)`` -> the jsonl path."""
    return _write_caption_dataset


@pytest.fixture(scope="session")
def shapes_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny jsonl captioning dataset of generated shapes: 8 train and 4 dev images, 2-3 captions each."""
    from diffcap.demo import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), train=8, dev=4, seed=0)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., "object"]:
    """``tiny_config(jsonl, **overrides)``: the tiny preset, made fast, on a jsonl dataset (no dev evaluation).

    Override keys use ``__`` for the dot: ``tiny_config(path, train__max_steps=50)``.
    """
    from diffcap.config import PRESETS, set_value, validate

    cache_base = tmp_path_factory.mktemp("feature-cache")

    def make(jsonl: Path, **overrides: object):
        config = PRESETS["tiny"]()
        values = {**FAST_TINY, "data.dataset": "jsonl", "data.root": str(jsonl), "data.eval_split": "",
                  "data.cache_dir": str(cache_base / Path(jsonl).parent.name),
                  **{k.replace("__", "."): v for k, v in overrides.items()}}
        for key, value in values.items():
            set_value(config, key, value)
        validate(config)
        return config

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(shapes_jsonl: Path, tiny_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny checkpoint trained for a few steps on ``shapes_jsonl``, shared by the tests that only need
    *a* checkpoint. Treat it as read-only: copy it before resuming or corrupting it."""
    from diffcap.train import train

    return train(tiny_config(shapes_jsonl), tmp_path_factory.mktemp("tiny-run") / "run", progress=False)


@pytest.fixture(scope="session")
def matched_checkpoint(tiny_checkpoint: Path, shapes_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny checkpoint with an image–text matcher fitted on its training images (read-only too)."""
    import shutil

    from diffcap.cli import main

    ckpt = tmp_path_factory.mktemp("matched") / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    cache = tmp_path_factory.mktemp("matched-cache")
    assert main(["fit-matcher", str(ckpt), "--dataset", "jsonl", "--root", str(shapes_jsonl),
                 "--cache-dir", str(cache)]) == 0
    return ckpt
