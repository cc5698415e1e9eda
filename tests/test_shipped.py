"""The checkpoint that ships with the package (issue: "ship it"): small, fp16, captioning-only, and it captions
the shipped example photos and evaluates a Flickr8k-layout folder holding only the test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffcap.app import DEFAULT_CHECKPOINT, EXAMPLES_DIR
from diffcap.checkpoint import load_checkpoint
from diffcap.cli import main
from conftest import write_test_only_flickr8k

pytestmark = pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "meta.json").is_file(), reason="no shipped checkpoint")


def test_shipped_checkpoint_is_small_fp16_and_holds_no_training_state() -> None:
    size = sum(f.stat().st_size for f in DEFAULT_CHECKPOINT.iterdir())
    assert size <= 40_000_000
    names = {f.name for f in DEFAULT_CHECKPOINT.iterdir()}
    assert names == {"config.json", "meta.json", "model.safetensors"}  # no optimizer / train state
    config, meta, tensors = load_checkpoint(DEFAULT_CHECKPOINT)
    weights = [v for k, v in tensors.items() if k.startswith("denoiser.") and v.is_floating_point()]
    assert weights and all(v.dtype == torch.float16 for v in weights)
    assert not any(k.startswith("text.table") for k in tensors)  # the word table comes from the text package
    assert meta["weights_dtype"] == "float16"
    # trained on the 6,000 Flickr8k training images (under the teacher's captions): their fingerprints are inside,
    # so `evaluate` refuses to score any of them
    assert config["data"]["train_split"] == "train" and len(tensors["data.train_image_hashes"]) == 6000
    # it chooses among 4 samples by its own image–text matcher (fp16 too) less 0.35 x its own denoising loss of
    # each: the best choice measured without a second model (ABLATIONS.md)
    assert (config["sample"]["candidates"], config["sample"]["select"], config["sample"]["self_weight"]) == \
        (4, "match", 0.35)
    matcher = [v for k, v in tensors.items() if k.startswith("matcher.")]
    assert matcher and all(v.dtype == torch.float16 for v in matcher)


def test_shipped_checkpoint_captions_the_example_photos(capsys) -> None:
    photos = sorted(EXAMPLES_DIR.glob("*.jpg"))
    assert main(["caption", *map(str, photos)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(photos)
    assert main(["caption", *map(str, photos), "--json"]) == 0  # the default: a choice among 4 samples
    records = json.loads(capsys.readouterr().out)
    assert all(len(r["candidates"]) == 4 and r["caption"] in r["candidates"] for r in records)
    assert [r["caption"] for r in records] == [line.split("\t")[1] for line in lines]
    for line, photo in zip(lines, photos):
        path, caption = line.split("\t")
        assert path == str(photo) and len(caption.split()) >= 2 and "[" not in caption


def test_shipped_checkpoint_evaluates_a_folder_holding_only_the_test_split(tmp_path: Path) -> None:
    root = tmp_path / "heldout"
    names = write_test_only_flickr8k(root, sorted(EXAMPLES_DIR.glob("*.jpg")), first_id=5000)
    output = tmp_path / "test.json"
    assert main(["evaluate", "--dataset", "flickr8k", "--root", str(root), "--split", "test",
                 "--cache-dir", str(tmp_path / "cache"), "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["split"] == "test" and {c["image"] for c in result["captions"]} == set(names)


def test_candidates_flag_reaches_the_sampler(capsys, monkeypatch) -> None:
    import diffcap.pipeline

    chosen = []
    select = diffcap.pipeline.mbr_select
    monkeypatch.setattr(diffcap.pipeline, "mbr_select", lambda row: chosen.append(len(row)) or select(row))
    photo = str(sorted(EXAMPLES_DIR.glob("*.jpg"))[0])
    assert main(["caption", photo, "--candidates", "3", "--select", "mbr"]) == 0
    assert chosen == [3] and len(capsys.readouterr().out.split()) >= 2  # one choice among 3 samples
    assert main(["caption", photo, "--candidates", "3", "--select", "mbr", "--trajectory"]) == 0
    assert chosen == [3, 3] and "(the kept one of 3 samples)" in capsys.readouterr().out  # --trajectory: the same choice


def test_shipped_model_finds_fluent_captions_of_the_photo_more_likely() -> None:
    """The model's own denoising loss (sample.self_weight) reads as a caption likelihood: each photo's caption
    costs less than the same words shuffled, and a caption of the astronaut or of the cat costs least under its
    own photo. (Not every caption does: "a cup of coffee" scores better under the cat photo, and "a rocket" under
    the coffee cup: these photos are far from Flickr8k's people and dogs.)"""
    from diffcap.captioner import Captioner
    from diffcap.pipeline import denoising_cross_entropy

    captioner = Captioner.from_pretrained(DEFAULT_CHECKPOINT)
    photos = sorted(EXAMPLES_DIR.glob("*.jpg"))
    assert [p.name for p in photos] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    image, rows = captioner.features(photos), list(range(len(photos)))
    fluent = ["a man in a space suit stands in front of a flag .", "a cat is laying on a blanket .",
              "a cup of coffee on a table .", "a rocket is launching into the sky ."]
    shuffled = ["front a of in flag suit man space a stands in .", "blanket a on laying is cat a .",
                "table of a coffee on cup a .", "sky the launching rocket into a is ."]
    assert (denoising_cross_entropy(captioner.model, image, fluent, rows)
            < denoising_cross_entropy(captioner.model, image, shuffled, rows) - 0.3).all()
    for k in (0, 1):  # the same caption and noise under each photo
        across = denoising_cross_entropy(captioner.model, image, [fluent[k]] * len(photos), [0] * len(photos))
        assert int(across.argmin()) == k
