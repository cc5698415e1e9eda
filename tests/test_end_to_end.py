"""End to end: data -> features -> training -> checkpoint -> captions, on tiny synthetic data (CPU, seconds)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from diffcap.captioner import Captioner
from diffcap.demo import Scene, Shape, draw_scene
from diffcap.train import train

# Four images that need four different captions: shape, colour, background and the number of shapes all vary.
OVERFIT = {
    "red_circle.png": (Scene((Shape("circle", "red", "large"),), "white"), "a red circle on a white background"),
    "blue_square.png": (Scene((Shape("square", "blue", "large"),), "black"), "a blue square on a black background"),
    "green_triangle.png": (Scene((Shape("triangle", "green", "large"),), "gray"), "a green triangle on a gray background"),
    "two_shapes.png": (Scene((Shape("circle", "yellow", "small"), Shape("square", "red", "large")), "white"),
                       "a yellow circle and a red square"),
}


def _draw(name: str):
    return draw_scene(OVERFIT[name][0], random.Random(name))


def test_tiny_model_overfits_four_images(tmp_path: Path, tiny_config, write_caption_dataset) -> None:
    # Each caption four times, so that one batch of 16 holds every image at four noise levels. 600 steps with a
    # short EMA: all four captions came out exactly for 3 training seeds x 5 sampling seeds (400 steps: not always).
    jsonl = write_caption_dataset(tmp_path / "data", [(name, [caption] * 4, "train")
                                                      for name, (_, caption) in OVERFIT.items()], _draw)
    config = tiny_config(jsonl, text__max_length=8, model__layers=2, train__batch_size=16, train__max_steps=600,
                         train__warmup_steps=20, train__cond_drop_prob=0.0, train__ema_decay=0.95,
                         train__max_minutes=1000.0)  # max_steps decides, even on a busy machine
    checkpoint = train(config, tmp_path / "run", progress=False)

    captioner = Captioner.from_pretrained(checkpoint)
    names = list(OVERFIT)
    captions = captioner.caption([tmp_path / "data" / name for name in names], seed=0)
    assert captions == [OVERFIT[name][1] for name in names]
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == 600


def test_checkpoint_reload_gives_identical_captions(tiny_checkpoint: Path, shapes_jsonl: Path) -> None:
    images = sorted((shapes_jsonl.parent / "images").glob("dev_*.png"))
    first = Captioner.from_pretrained(tiny_checkpoint).caption(images, seed=3)
    second = Captioner.from_pretrained(tiny_checkpoint)
    assert second.caption(images, seed=3) == first
    assert all(isinstance(c, str) for c in first) and len(first) == len(images)
    trajectory = second.trajectory(images[0], seed=3)
    assert trajectory[-1].caption == first[0]
    assert second.trajectory(images[1], seed=3, index=1)[-1].caption == first[1]
    # a caption depends on the image's place in the list, not on how the list is cut into batches
    assert second.caption(images, seed=3, batch_size=1) == first
    assert [s.t for s in trajectory] == sorted((s.t for s in trajectory), reverse=True)


def test_resume_continues_from_the_saved_step(tiny_checkpoint: Path, shapes_jsonl: Path, tiny_config,
                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_checkpoint.parent, run_dir)
    saved = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    config = tiny_config(shapes_jsonl)
    assert saved["step"] == config.train.max_steps

    with pytest.raises(FileExistsError, match="--resume"):
        train(config, run_dir, progress=False)  # not without resume=True

    config.train.max_steps = saved["step"] + 5
    checkpoint = train(config, run_dir, resume=True, progress=False)
    meta = json.loads((checkpoint / "meta.json").read_text())
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert meta["step"] == state["step"] == saved["step"] + 5
    assert Captioner.from_pretrained(checkpoint).caption(sorted((shapes_jsonl.parent / "images").glob("dev_*.png")))


def test_clip_encoder_end_to_end(tmp_path: Path, shapes_jsonl: Path, tiny_config) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    clip_dir = tmp_path / "tiny-clip"
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(vision).save_pretrained(clip_dir)

    config = tiny_config(shapes_jsonl, encoder__name=f"clip:{clip_dir}", train__max_steps=5,
                         data__cache_dir=str(tmp_path / "features"))
    checkpoint = train(config, tmp_path / "run", progress=False)

    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["encoder"]["encoder"] == "clip"
    assert meta["encoder"]["model_id"] == str(clip_dir)
    assert meta["encoder"]["pooled_dim"] == 16 and meta["encoder"]["grid_dim"] == 32
    assert meta["encoder"]["grid_size"] == 4
    features_meta = json.loads((tmp_path / "features" / "train" / "meta.json").read_text())
    assert features_meta["identity"] == meta["encoder"]

    captioner = Captioner.from_pretrained(checkpoint)
    assert captioner.encoder.name == "clip"
    captions = captioner.caption(sorted((shapes_jsonl.parent / "images").glob("dev_*.png"))[:2])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_demo_writes_a_self_contained_page(tmp_path: Path, capsys) -> None:
    from diffcap.demo import run_demo

    page = run_demo(tmp_path / "demo", minutes=0.05, train_images=12, dev_images=4)
    assert page == tmp_path / "demo" / "index.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert text.count("data:image/png;base64,") == 4 + 3  # table + trajectories
    assert "BLEU-4" in text and "CIDEr" in text and "t=   0:" in text
    rows = (tmp_path / "demo" / "data" / "captions.jsonl").read_text().splitlines()
    splits = {json.loads(r)["image"]: json.loads(r)["split"] for r in rows}
    assert sum(s == "train" for s in splits.values()) == 12 and sum(s == "dev" for s in splits.values()) == 4
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert len(results["captions"]) == 4 and results["step"] >= 1
    assert "dev (4 images)" in capsys.readouterr().out

    # running it again re-renders the page from the model already trained, without training again
    before = (tmp_path / "demo" / "run" / "checkpoint" / "meta.json").read_text()
    run_demo(tmp_path / "demo", minutes=0.05, train_images=12, dev_images=4)
    assert "reusing the model trained earlier" in capsys.readouterr().out
    assert (tmp_path / "demo" / "run" / "checkpoint" / "meta.json").read_text() == before


def test_shapes_dataset_is_deterministic_and_truthful(tmp_path: Path) -> None:
    from PIL import Image

    from diffcap.data.datasets import load_all
    from diffcap.demo import BACKGROUNDS, COLOURS, make_shapes_dataset

    a = make_shapes_dataset(tmp_path / "a", train=10, dev=3, seed=5)
    b = make_shapes_dataset(tmp_path / "b", train=10, dev=3, seed=5)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a" / "images" / "dev_0002.png").read_bytes() == (tmp_path / "b" / "images" / "dev_0002.png").read_bytes()
    splits = load_all("jsonl", a)  # also checks that no image is in two splits
    assert [len(splits["train"]), len(splits["dev"])] == [10, 3]
    for record in splits["train"] + splits["dev"]:
        assert 2 <= len(record.captions) <= 3
        # the colour named first is the colour of the image's leftmost coloured pixel
        image = Image.open(record.path).convert("RGB")
        first = next(word for word in record.captions[0].split() if word in COLOURS)
        background = next(word for word in record.captions[1].split() if word in BACKGROUNDS)
        assert image.getpixel((0, 0)) == BACKGROUNDS[background]
        width, height = image.size
        leftmost = next(image.getpixel((x, y)) for x in range(width) for y in range(height)
                        if image.getpixel((x, y)) != BACKGROUNDS[background])
        assert leftmost == COLOURS[first], (record.key, record.captions[0])
