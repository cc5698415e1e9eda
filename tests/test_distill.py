"""diffcap distill-data: a teacher's captions of the training images become a jsonl dataset's training captions;
the evaluation split keeps its references, image keys stay the dataset's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffcap.cli import main
from diffcap.config import DataConfig
from diffcap.data.datasets import DatasetError, ImageRecord
from diffcap.data.distill import best_captions, image_root, read_teacher_captions, teacher_rows
from diffcap.data.prepare import split_records


def _records(folder: Path, n: int, split: str) -> list[ImageRecord]:
    return [ImageRecord(f"{split}_{i}.jpg", folder / f"{split}_{i}.jpg", (f"ref one {i}", f"ref two {i}"))
            for i in range(n)]


def test_rows_hold_the_teacher_caption_for_training_and_references_for_evaluation(tmp_path) -> None:
    train, dev = _records(tmp_path, 3, "train"), _records(tmp_path, 2, "dev")
    teacher = {r.key: f"teacher {r.key}" for r in train} | {"dev_0.jpg": "never used"}
    rows = teacher_rows(train, teacher, dev)
    assert rows[0] == {"image": "train_0.jpg", "caption": ["teacher train_0.jpg"], "split": "train"}
    assert rows[3] == {"image": "dev_0.jpg", "caption": ["ref one 0", "ref two 0"], "split": "dev"}
    both = teacher_rows(train, teacher, dev, keep_references=True)
    assert both[1]["caption"] == ["teacher train_1.jpg", "ref one 1", "ref two 1"]
    assert image_root(train + dev) == tmp_path
    elsewhere = ImageRecord("x.jpg", tmp_path / "other" / "y.jpg", ("a caption",))  # key is not its path's tail
    with pytest.raises(DatasetError, match="one folder"):
        image_root(train + [elsewhere])


def test_a_training_image_without_a_teacher_caption_is_named(tmp_path) -> None:
    train = _records(tmp_path, 3, "train")
    with pytest.raises(DatasetError, match="lack 1 of 3 training images.*train_2.jpg"):
        teacher_rows(train, {"train_0.jpg": "a", "train_1.jpg": "b", "train_2.jpg": "  "}, [])


@pytest.mark.parametrize(("text", "message"), [(None, "not found"), ("{", "not valid JSON"),
                                               ('{"captions": [{"image": "a.jpg"}]}', "expected the output")])
def test_unreadable_teacher_files_say_why(tmp_path, text, message) -> None:
    path = tmp_path / "teacher.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_teacher_captions(path)


def test_cli_writes_a_dataset_that_reads_back(tmp_path, shapes_jsonl, capsys) -> None:
    data = DataConfig(dataset="jsonl", root=str(shapes_jsonl))
    train, dev = split_records(data, "train"), split_records(data, "dev")
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({"captions": [{"image": r.key, "caption": f"shape {i}"} for i, r in enumerate(train)]}))
    out = tmp_path / "distilled.jsonl"
    assert main(["distill-data", str(teacher), "--dataset", "jsonl", "--root", str(shapes_jsonl), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"data.image_root={shapes_jsonl.parent.resolve()}" in printed
    again = DataConfig(dataset="jsonl", root=str(out), image_root=str(shapes_jsonl.parent))
    assert [r.captions for r in split_records(again, "train")] == [(f"shape {i}",) for i in range(len(train))]
    assert [(r.key, r.captions, r.path) for r in split_records(again, "dev")] == [(r.key, r.captions, r.path) for r in dev]
    # a teacher file missing images: a clear error, exit code 2, nothing written
    teacher.write_text(json.dumps({"captions": []}))
    assert main(["distill-data", str(teacher), "--dataset", "jsonl", "--root", str(shapes_jsonl),
                 "--out", str(tmp_path / "none.jsonl")]) == 2
    assert "lack" in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()


def test_best_captions_keep_each_images_caption_closest_to_its_references(tmp_path) -> None:
    train = [ImageRecord("a.jpg", tmp_path / "a.jpg", ("a dog runs on the grass", "a brown dog runs on grass")),
             ImageRecord("b.jpg", tmp_path / "b.jpg", ("a girl rides a red bike", "a child on a red bicycle")),
             ImageRecord("c.jpg", tmp_path / "c.jpg", ("two men play football", "men playing soccer on a field"))]
    first = {"a.jpg": "a dog runs on the grass", "b.jpg": "a dog runs on the grass", "c.jpg": "a cat"}
    second = {"a.jpg": "a girl rides a red bike", "b.jpg": "a girl rides a red bike"}  # lacks c.jpg
    chosen, wins = best_captions(train, [first, second])
    assert chosen == {"a.jpg": "a dog runs on the grass", "b.jpg": "a girl rides a red bike", "c.jpg": "a cat"}
    assert wins == [2, 1]
    # equal scores: the earlier source's caption
    assert best_captions(train, [second, dict(second)])[1] == [2, 0]
    assert best_captions(train, [{}, {}]) == ({}, [0, 0])
    with pytest.raises(DatasetError, match="no caption files"):
        best_captions(train, [])


def test_cli_chooses_among_several_caption_files(tmp_path, shapes_jsonl, capsys) -> None:
    data = DataConfig(dataset="jsonl", root=str(shapes_jsonl))
    train = split_records(data, "train")
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"captions": [{"image": r.key, "caption": r.captions[0]} for r in train]}))
    bad.write_text(json.dumps({"captions": [{"image": r.key, "caption": "zzz"} for r in train]}))
    out = tmp_path / "best.jsonl"
    assert main(["distill-data", str(bad), str(good), "--dataset", "jsonl", "--root", str(shapes_jsonl),
                 "--out", str(out)]) == 0
    assert f"{good} ({len(train)} images)" in capsys.readouterr().out
    again = DataConfig(dataset="jsonl", root=str(out), image_root=str(shapes_jsonl.parent))
    assert [r.captions for r in split_records(again, "train")] == [(r.captions[0],) for r in train]
