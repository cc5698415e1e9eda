"""Tests for diffcap.data.datasets on tiny datasets built in tmp_path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from diffcap.data.datasets import (
    DATASET_KINDS,
    DatasetError,
    ImageRecord,
    available_splits,
    check_no_leakage,
    load_all,
    load_split,
)

TOKENS = "Flickr8k.token.txt"


def make_images(folder: Path, *names: str) -> None:
    """Write tiny JPEG images (names may contain sub-folders)."""
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (200, 30, 30)).save(path)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def make_flickr8k(
    root: Path,
    *,
    tokens: str | None = None,
    train: str = "a.jpg\nb.jpg\n",
    dev: str | None = "c.jpg\n",
    test: str | None = None,
    images: tuple[str, ...] = ("a.jpg", "b.jpg", "c.jpg"),
    image_dir: str = "images",
    text_dir: str = ".",
) -> Path:
    """A small official-layout Flickr8k folder: a, b in train, c in dev, no test list by default."""
    if tokens is None:
        tokens = (
            "a.jpg#0\tA dog runs .\n"
            "a.jpg#1\tA brown dog is running on grass\n"
            "b.jpg#0\tTwo Cats sleep .\n"
            "c.jpg#0\tA child jumps .\n"
            "c.jpg#1\tA kid in the air .\n"
            "z.jpg#0\tAn image that is in no split .\n"
        )
    text = root / text_dir
    write(text / TOKENS, tokens)
    for name, content in (("train", train), ("dev", dev), ("test", test)):
        if content is not None:
            write(text / f"Flickr_8k.{name}Images.txt", content)
    make_images(root / image_dir, *images)
    return root


# ----------------------------------------------------------------------------------------------------------------
# flickr8k
# ----------------------------------------------------------------------------------------------------------------


def test_kinds() -> None:
    assert DATASET_KINDS == ("flickr8k", "karpathy", "jsonl", "csv")
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        available_splits("coco", Path("."))


def test_flickr8k_official_layout(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path)
    assert available_splits("flickr8k", root) == ["train", "dev"]
    train = load_split("flickr8k", root, "train")
    assert train == [
        ImageRecord("a.jpg", (root / "images" / "a.jpg").absolute(), ("A dog runs .", "A brown dog is running on grass")),
        ImageRecord("b.jpg", (root / "images" / "b.jpg").absolute(), ("Two Cats sleep .",)),
    ]
    assert all(record.path.is_absolute() for record in train)
    splits = load_all("flickr8k", root)
    assert list(splits) == ["train", "dev"]
    assert [r.key for r in splits["dev"]] == ["c.jpg"]
    assert splits["dev"][0].captions == ("A child jumps .", "A kid in the air .")


@pytest.mark.parametrize("image_dir", ["Flickr8k_Dataset", "Flicker8k_Dataset", "Flickr8k_Dataset/Flicker8k_Dataset"])
def test_flickr8k_text_subfolder_and_image_folder_names(tmp_path: Path, image_dir: str) -> None:
    root = make_flickr8k(tmp_path, image_dir=image_dir, text_dir="Flickr8k_text", test="c.jpg\n", dev=None)
    assert available_splits("flickr8k", root) == ["train", "test"]
    test = load_split("flickr8k", root, "test")
    assert test[0].path == (root / image_dir / "c.jpg").absolute()


def test_flickr8k_image_root_override(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path, image_dir="elsewhere")
    with pytest.raises(DatasetError, match="no Flickr8k images folder"):
        load_split("flickr8k", root, "train")
    records = load_split("flickr8k", root, "train", image_root=root / "elsewhere")
    assert records[0].path == (root / "elsewhere" / "a.jpg").absolute()


def test_flickr8k_missing_split_list_is_unavailable(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path)
    with pytest.raises(DatasetError) as error:
        load_split("flickr8k", root, "test")
    assert str(error.value) == (
        f"split 'test' is not available in {root}: Flickr_8k.testImages.txt not found; available: train, dev"
    )


def test_flickr8k_blank_lines_are_skipped(tmp_path: Path) -> None:
    tokens = "\na.jpg#0\tA dog runs .\n\n   \nb.jpg#0\tA cat .\n\n"
    root = make_flickr8k(tmp_path, tokens=tokens, train="\na.jpg\n\nb.jpg\n\n", dev=None)
    records = load_split("flickr8k", root, "train")
    assert [(r.key, r.captions) for r in records] == [("a.jpg", ("A dog runs .",)), ("b.jpg", ("A cat .",))]


def test_flickr8k_windows_line_endings_and_bom(tmp_path: Path) -> None:
    tokens = "\ufeffa.jpg#0\tA dog runs .\r\na.jpg#1\tA dog .\r\nb.jpg#0\tA cat .\r\n"
    root = make_flickr8k(tmp_path, tokens=tokens, train="\ufeffa.jpg\r\nb.jpg\r\n", dev=None)
    records = load_split("flickr8k", root, "train")
    assert [(r.key, r.captions) for r in records] == [("a.jpg", ("A dog runs .", "A dog .")), ("b.jpg", ("A cat .",))]


def test_flickr8k_captions_are_stripped_and_keep_case(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path, tokens="a.jpg#0\t   A Big DOG .  \t \nb.jpg#0\tx\n", dev=None)
    assert load_split("flickr8k", root, "train")[0].captions == ("A Big DOG .",)


def test_flickr8k_non_utf8_bytes_name_file_and_line(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path)
    (root / TOKENS).write_bytes(b"a.jpg#0\tA dog .\nb.jpg#0\tA cat .\nc.jpg#0\tA caf\xe9 \xff\xfe .\n")
    with pytest.raises(DatasetError, match=r"Flickr8k\.token\.txt:3: not valid UTF-8"):
        load_split("flickr8k", root, "train")


def test_flickr8k_missing_tab_names_file_and_line(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path, tokens="a.jpg#0\tA dog .\nb.jpg#0 A cat without a tab .\n")
    with pytest.raises(DatasetError, match=r"Flickr8k\.token\.txt:2: .*no tab"):
        load_split("flickr8k", root, "train")


def test_flickr8k_empty_captions_are_skipped_with_a_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens = "a.jpg#0\tA dog .\na.jpg#1\t \na.jpg#2\t\nb.jpg#0\tA cat .\nc.jpg#0\tA kid .\n"
    root = make_flickr8k(tmp_path, tokens=tokens)
    with caplog.at_level(logging.WARNING, logger="diffcap"):
        records = load_split("flickr8k", root, "train")
    assert records[0].captions == ("A dog .",)
    messages = [r.getMessage() for r in caplog.records if "empty caption" in r.getMessage()]
    assert len(messages) == 1 and "skipped 2 empty caption(s)" in messages[0]


def test_flickr8k_images_missing_on_disk_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens = "a.jpg#0\tA dog .\nb.jpg#0\tA cat .\nx.jpg#0\tGone .\ny.jpg#0\tGone too .\n"
    root = make_flickr8k(tmp_path, tokens=tokens, train="a.jpg\nx.jpg\nb.jpg\ny.jpg\n", dev=None)
    with caplog.at_level(logging.WARNING, logger="diffcap"):
        records = load_split("flickr8k", root, "train")
    assert [r.key for r in records] == ["a.jpg", "b.jpg"]
    messages = [r.getMessage() for r in caplog.records if r.name == "diffcap"]
    assert len(messages) == 1
    assert "dropped 2 image(s) whose file is not under" in messages[0] and "x.jpg, y.jpg" in messages[0]


def test_flickr8k_listed_images_without_caption_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_flickr8k(tmp_path, train="a.jpg\nb.jpg\nnocap.jpg\n", images=("a.jpg", "b.jpg", "c.jpg", "nocap.jpg"))
    with caplog.at_level(logging.WARNING, logger="diffcap"):
        records = load_split("flickr8k", root, "train")
    assert [r.key for r in records] == ["a.jpg", "b.jpg"]
    assert any("dropped 1 image(s) that have no caption: nocap.jpg" in r.getMessage() for r in caplog.records)


def test_flickr8k_empty_split_raises(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path, dev="\n\n")
    with pytest.raises(DatasetError, match="split 'dev' has no images with captions"):
        load_split("flickr8k", root, "dev")
    root2 = make_flickr8k(tmp_path / "two", dev="nocap.jpg\n")
    with pytest.raises(DatasetError, match="split 'dev' has no images with captions"):
        load_all("flickr8k", root2)


def test_flickr8k_missing_root_or_files_raise_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_split("flickr8k", tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match="does not exist"):
        available_splits("flickr8k", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is not a Flickr8k folder"):
        load_split("flickr8k", tmp_path / "empty", "train")
    root = make_flickr8k(tmp_path / "notokens")
    (root / TOKENS).unlink()
    with pytest.raises(DatasetError, match=r"Flickr8k\.token\.txt not found"):
        load_split("flickr8k", root, "train")


def test_flickr8k_image_in_two_split_lists_is_leakage(tmp_path: Path) -> None:
    root = make_flickr8k(tmp_path, dev="c.jpg\na.jpg\n")
    with pytest.raises(DatasetError, match="a.jpg in 'train' and 'dev'"):
        load_split("flickr8k", root, "train")
    with pytest.raises(DatasetError, match="more than one split"):
        load_all("flickr8k", root)


# ----------------------------------------------------------------------------------------------------------------
# check_no_leakage
# ----------------------------------------------------------------------------------------------------------------


def test_check_no_leakage(tmp_path: Path) -> None:
    a = ImageRecord("a.jpg", tmp_path / "a.jpg", ("x",))
    b = ImageRecord("b.jpg", tmp_path / "b.jpg", ("y",))
    check_no_leakage({"train": [a], "dev": [b]})
    check_no_leakage({"train": [a, a]})  # repeats inside one split are not leakage
    with pytest.raises(DatasetError, match="a.jpg in 'dev' and 'train'|a.jpg in 'train' and 'dev'"):
        check_no_leakage({"train": [a, b], "dev": [a]})
    same_file = ImageRecord("sub/../a.jpg", tmp_path / "sub" / ".." / "a.jpg", ("z",))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DatasetError, match="image file"):
        check_no_leakage({"train": [a], "test": [same_file]})


# ----------------------------------------------------------------------------------------------------------------
# karpathy
# ----------------------------------------------------------------------------------------------------------------


def karpathy_entry(filename: str, split: str, *captions: str, filepath: str | None = None) -> dict:
    entry: dict = {
        "filename": filename,
        "split": split,
        "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions],
    }
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def make_karpathy(root: Path, images: list[dict], name: str = "dataset_flickr8k.json") -> Path:
    write(root / name, json.dumps({"images": images, "dataset": "flickr8k"}))
    for image in images:
        make_images(root, f"{image['filepath']}/{image['filename']}" if "filepath" in image else image["filename"])
    return root


def test_karpathy_split_mapping(tmp_path: Path) -> None:
    root = make_karpathy(
        tmp_path,
        [
            karpathy_entry("t.jpg", "train", "A dog .", " A Dog runs . "),
            karpathy_entry("r.jpg", "restval", "Restval goes to train ."),
            karpathy_entry("v.jpg", "val", "Val is dev ."),
            karpathy_entry("s.jpg", "test", "A test ."),
        ],
    )
    assert available_splits("karpathy", root) == ["train", "dev", "test"]
    splits = load_all("karpathy", root)
    assert [r.key for r in splits["train"]] == ["t.jpg", "r.jpg"]
    assert splits["train"][0].captions == ("A dog .", "A Dog runs .")
    assert [r.key for r in splits["dev"]] == ["v.jpg"]
    assert [r.key for r in splits["test"]] == ["s.jpg"]
    assert splits["test"][0].path == (root / "s.jpg").absolute()


def test_karpathy_filepath_tokens_annotations_and_image_root(tmp_path: Path) -> None:
    images = [
        karpathy_entry("COCO_1.jpg", "train", "A bus .", filepath="train2014"),
        {"filename": "COCO_2.jpg", "filepath": "val2014", "split": "val", "sentences": [{"tokens": ["a", "car"]}]},
    ]
    annotations = write(tmp_path / "ann" / "dataset_coco.json", json.dumps({"images": images}))
    make_images(tmp_path / "img", "train2014/COCO_1.jpg", "val2014/COCO_2.jpg")
    splits = load_all("karpathy", tmp_path, annotations=annotations, image_root=tmp_path / "img")
    assert splits["train"][0].key == "train2014/COCO_1.jpg"
    assert splits["train"][0].path == (tmp_path / "img" / "train2014" / "COCO_1.jpg").absolute()
    assert splits["dev"][0].captions == ("a car",)
    with pytest.raises(DatasetError, match="split 'test' is not available"):
        load_split("karpathy", tmp_path, "test", annotations=annotations, image_root=tmp_path / "img")
    # root may also be the annotation file itself
    assert available_splits("karpathy", annotations) == ["train", "dev"]


def test_karpathy_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"found no files matching dataset_\*\.json"):
        load_split("karpathy", tmp_path, "train")
    write(tmp_path / "dataset_a.json", "{}")
    write(tmp_path / "dataset_b.json", "{}")
    with pytest.raises(DatasetError, match="found 2"):
        load_split("karpathy", tmp_path, "train")
    bad = write(tmp_path / "bad" / "dataset_x.json", '{"images": [\n  {"filename": "a.jpg",,}\n]}')
    with pytest.raises(DatasetError, match=r"dataset_x\.json:2: not valid JSON"):
        load_split("karpathy", bad, "train")
    odd = write(tmp_path / "odd" / "dataset_x.json", json.dumps({"images": [karpathy_entry("a.jpg", "holdout", "x")]}))
    with pytest.raises(DatasetError, match=r"images\[0\].*'holdout'"):
        load_split("karpathy", odd, "train")
    with pytest.raises(DatasetError, match="annotation file .* not found"):
        load_split("karpathy", tmp_path, "train", annotations=tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------------------------
# jsonl and csv
# ----------------------------------------------------------------------------------------------------------------


def test_jsonl_with_split_column_groups_rows(tmp_path: Path) -> None:
    rows = [
        {"image": "pics/a.jpg", "caption": "A dog .", "split": "train"},
        {"image": "pics/b.jpg", "caption": "A cat .", "split": "val"},
        {"image": "pics/a.jpg", "caption": "A dog runs .", "split": "train"},
        {"image": "pics/c.jpg", "caption": ["One .", "Two ."], "split": "test"},
    ]
    write(tmp_path / "captions.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    make_images(tmp_path, "pics/a.jpg", "pics/b.jpg", "pics/c.jpg")
    assert available_splits("jsonl", tmp_path) == ["train", "dev", "test"]
    splits = load_all("jsonl", tmp_path)
    assert [(r.key, r.captions) for r in splits["train"]] == [("pics/a.jpg", ("A dog .", "A dog runs ."))]
    assert splits["dev"][0].key == "pics/b.jpg"
    assert splits["test"][0].captions == ("One .", "Two .")


def test_jsonl_without_split_column_is_all_train(tmp_path: Path) -> None:
    rows = [{"image": "a.jpg", "caption": "A dog ."}, {"image": "b.jpg", "caption": "A cat ."}]
    write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in rows))
    make_images(tmp_path / "img", "a.jpg", "b.jpg")
    assert available_splits("jsonl", tmp_path) == ["train"]
    records = load_split("jsonl", tmp_path, "train", image_root=tmp_path / "img")
    assert [r.key for r in records] == ["a.jpg", "b.jpg"]
    with pytest.raises(DatasetError, match="no split column, so all its rows form split 'train'"):
        load_split("jsonl", tmp_path, "dev")


def test_jsonl_errors(tmp_path: Path) -> None:
    write(tmp_path / "x.jsonl", '{"image": "a.jpg", "caption": "A dog ."}\n{"image": "b.jpg"\n')
    with pytest.raises(DatasetError, match=r"x\.jsonl:2: not valid JSON"):
        load_split("jsonl", tmp_path, "train")
    write(tmp_path / "x.jsonl", '{"image": "a.jpg", "caption": "A dog ."}\n{"image": "b.jpg"}\n')
    with pytest.raises(DatasetError, match=r"x\.jsonl:2: expected a JSON object with 'image' and 'caption'"):
        load_split("jsonl", tmp_path, "train")
    write(tmp_path / "x.jsonl", '{"image": "a.jpg", "caption": "A", "split": "train"}\n{"image": "b.jpg", "caption": "B"}\n')
    with pytest.raises(DatasetError, match=r"x\.jsonl:2: this row lacks a 'split'"):
        load_split("jsonl", tmp_path, "train")


def test_csv_with_split_column_bom_and_crlf(tmp_path: Path) -> None:
    text = (
        "\ufeffimage,caption,split\r\n"
        'a.jpg,"A dog, running .",train\r\n'
        "b.jpg,A cat .,dev\r\n"
        "\r\n"
        "a.jpg,  Another Dog .  ,train\r\n"
        "b.jpg,,dev\r\n"
    )
    write(tmp_path / "caps.csv", text)
    make_images(tmp_path, "a.jpg", "b.jpg")
    splits = load_all("csv", tmp_path)
    assert [(r.key, r.captions) for r in splits["train"]] == [("a.jpg", ("A dog, running .", "Another Dog ."))]
    assert [(r.key, r.captions) for r in splits["dev"]] == [("b.jpg", ("A cat .",))]


def test_csv_without_split_column_is_all_train(tmp_path: Path) -> None:
    write(tmp_path / "caps.csv", "image,caption\na.jpg,A dog .\nb.jpg,A cat .\na.jpg,A pup .\n")
    make_images(tmp_path, "a.jpg", "b.jpg")
    assert available_splits("csv", tmp_path) == ["train"]
    records = load_split("csv", tmp_path / "caps.csv", "train")
    assert [(r.key, r.captions) for r in records] == [("a.jpg", ("A dog .", "A pup .")), ("b.jpg", ("A cat .",))]


def test_csv_errors(tmp_path: Path) -> None:
    write(tmp_path / "caps.csv", "file,text\na.jpg,A dog .\n")
    with pytest.raises(DatasetError, match=r"caps\.csv:1: the header must name the columns 'image' and 'caption'"):
        load_split("csv", tmp_path, "train")
    (tmp_path / "caps.csv").write_bytes(b"image,caption\na.jpg,A dog .\nb.jpg,\x89PNG\x00\xff\n")
    with pytest.raises(DatasetError, match=r"caps\.csv:3: not valid UTF-8"):
        load_split("csv", tmp_path, "train")
    write(tmp_path / "caps.csv", "image,caption,split\na.jpg,A dog .,train\na.jpg,A dog .,test\n")
    make_images(tmp_path, "a.jpg")
    with pytest.raises(DatasetError, match="a.jpg in 'train' and 'test'"):
        load_all("csv", tmp_path)
