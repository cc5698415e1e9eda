"""Captioning photo collections: folders (by content), per-file failures that never lose the rest, caption
files (.jsonl/.csv/.json) written atomically, and --resume after an interrupted run."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import diffcap.data.collection
from diffcap.captioner import Captioner
from diffcap.cli import main
from diffcap.data.collection import find_images
from diffcap.data.images import ImageLoadError

NON_UTF8 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 file name, not valid UTF-8


def _photo(path: Path, colour: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path, format=fmt)
    return path


@pytest.fixture
def album(tmp_path: Path) -> Path:
    """A folder as users have them: photos (one without an extension, one named .txt), a hidden file, notes,
    a broken photo, an empty one, a subfolder with a photo, and a symbolic link loop."""
    root = tmp_path / "album"
    _photo(root / "a.png")
    _photo(root / "b.jpg", (20, 200, 20), "JPEG")
    _photo(root / "scan", (20, 20, 200))  # no extension: an image by content
    _photo(root / "mislabelled.txt", (90, 90, 90))  # a PNG named .txt
    _photo(root / ".thumbnail.png")
    (root / "notes.md").write_text("# holiday\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"truncated" * 4)
    (root / "empty.png").write_bytes(b"")
    _photo(root / "day2" / "c.png", (200, 200, 20))
    (root / "day2" / "loop").symlink_to(root, target_is_directory=True)
    return root


def _names(paths: list[str]) -> list[str]:
    return [Path(p).name for p in paths]


# -- finding images --------------------------------------------------------------------------------------------


def test_find_images_reads_folders_by_content(album: Path) -> None:
    found = find_images([album])
    assert _names(found.images) == ["a.png", "b.jpg", "broken.jpg", "empty.png", "mislabelled.txt", "scan"]
    assert found.skipped == {"hidden": 1, "not an image": 1, "subfolder (use --recursive)": 1}
    assert found.failed == {}


def test_find_images_recursive_enters_each_folder_once(album: Path) -> None:
    found = find_images([album], recursive=True)
    assert "c.png" in _names(found.images)
    assert len(found.images) == 7  # the loop back to the album adds nothing
    assert found.skipped["already visited (symbolic link loop)"] == 1
    # a file named explicitly is kept once even when its folder lists it too
    again = find_images([album / "a.png", album])
    assert _names(again.images).count("a.png") == 1


def test_find_images_reports_what_cannot_be_read(album: Path, monkeypatch) -> None:
    (album / "gone.png").symlink_to(album / "deleted.png")  # a broken link
    real_scandir = os.scandir

    def scandir(path):  # the tests may run as root, where chmod 000 does not stop reading
        if Path(path).name == "day2":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(diffcap.data.collection.os, "scandir", scandir)
    real_sniff = diffcap.data.collection.sniff_image

    def sniff(path: Path) -> bool:
        if path.name == "a.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_sniff(path)

    monkeypatch.setattr(diffcap.data.collection, "sniff_image", sniff)
    found = find_images([album], recursive=True)
    assert found.failed == {
        str(album / "a.png"): "cannot read (Permission denied)",
        str(album / "day2"): "cannot list folder (Permission denied)",
        str(album / "gone.png"): "broken or looping symbolic link",
    }
    assert "a.png" not in _names(found.images) and "b.jpg" in _names(found.images)


def test_find_images_keeps_non_utf8_names(tmp_path: Path) -> None:
    _photo(tmp_path / NON_UTF8)
    (found,) = find_images([tmp_path]).images
    assert os.fsencode(found).endswith(b"caf\xe9.png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_find_images_unreadable_permissions_for_real(tmp_path: Path) -> None:
    locked = _photo(tmp_path / "locked.png")
    locked.chmod(0)
    try:
        assert find_images([tmp_path]).failed == {str(locked): "cannot read (Permission denied)"}
    finally:
        locked.chmod(0o644)


# -- the command line ----------------------------------------------------------------------------------------


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def test_caption_a_folder_reports_bad_files_and_captions_the_rest(tiny_checkpoint: Path, album: Path,
                                                                   capsys) -> None:
    code, out, err = _run(["caption", str(tiny_checkpoint), str(album), "-r", "--steps", "3"], capsys)
    assert code == 1  # something failed
    captioned = [line.split("\t") for line in out.splitlines()]
    assert sorted(_names([path for path, _ in captioned])) == ["a.png", "b.jpg", "c.png", "mislabelled.txt", "scan"]
    assert all(caption.strip() for _, caption in captioned)
    failures = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failures) == 2
    assert any("broken.jpg: " in line for line in failures) and any("empty.png: " in line for line in failures)
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("captioned 5, failed 2; skipped 1 already visited (symbolic link loop), 1 hidden, "
                              "1 not an image"), summary
    assert "images/s" in summary

    # the same images without failures: exit code 0
    code, out, err = _run(["caption", str(tiny_checkpoint), str(album / "a.png"), str(album / "scan"),
                           "--steps", "3"], capsys)
    assert code == 0 and len(out.splitlines()) == 2 and "captioned 2, failed 0" in err


def test_caption_refuses_an_ambiguous_folder_and_a_folder_without_images(tiny_checkpoint: Path, tmp_path: Path,
                                                                         capsys) -> None:
    both = tmp_path / "both"
    shutil.copytree(tiny_checkpoint, both)
    _photo(both / "photo.png")
    other = _photo(tmp_path / "other.png")
    code, _, err = _run(["caption", str(both), str(other)], capsys)
    assert code == 2 and "both a checkpoint" in err and "--checkpoint" in err
    code, out, _ = _run(["caption", "--checkpoint", str(both), str(other), "--steps", "3"], capsys)
    assert code == 0 and out.strip()
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "readme.txt").write_text("no photos here")
    code, _, err = _run(["caption", str(tiny_checkpoint), str(empty)], capsys)
    assert code == 2 and "no image found" in err and "1 not an image" in err


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_caption_output_files(tiny_checkpoint: Path, album: Path, tmp_path: Path, suffix: str, capsys) -> None:
    _photo(album / NON_UTF8, (10, 120, 120))
    output = tmp_path / f"captions{suffix}"
    code, out, err = _run(["caption", str(tiny_checkpoint), str(album), "--steps", "3", "--candidates", "2",
                           "--output", str(output)], capsys)
    assert code == 1 and out == ""  # the captions went to the file
    assert f"wrote 5 records to {output}" in err
    assert not output.with_name(output.name + ".partial").exists()
    text = output.read_text(encoding="utf-8", errors="surrogateescape")
    if suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines()]
    elif suffix == ".json":
        records = json.loads(text)
    else:
        records = [{**row, "candidates": json.loads(row["candidates"])} for row in csv.DictReader(io.StringIO(text))]
        assert text.splitlines()[0] == "path,caption,candidates"
    assert [set(r) for r in records] == [{"path", "caption", "candidates"}] * 5
    assert all(len(r["candidates"]) == 2 and r["caption"] in r["candidates"] for r in records)
    paths = [r["path"] for r in records]
    assert str(album / NON_UTF8) in paths  # the undecodable name round-trips exactly
    assert "broken.jpg" not in " ".join(paths)


def test_caption_json_to_stdout(tiny_checkpoint: Path, album: Path, capsys) -> None:
    images = [str(album / "a.png"), str(album / "scan")]
    code, out, _ = _run(["caption", str(tiny_checkpoint), *images, "--steps", "3", "--seed", "1", "--json"], capsys)
    assert code == 0
    records = json.loads(out)
    assert [r["path"] for r in records] == images and all(r["caption"] for r in records)
    code, text, _ = _run(["caption", str(tiny_checkpoint), *images, "--steps", "3", "--seed", "1"], capsys)
    assert text.splitlines() == [f"{r['path']}\t{r['caption']}" for r in records]


def test_caption_output_refuses_bad_names_before_loading(tiny_checkpoint: Path, album: Path, tmp_path: Path,
                                                          capsys) -> None:
    code, _, err = _run(["caption", str(tiny_checkpoint), str(album), "--output", str(tmp_path / "c.txt")], capsys)
    assert code == 2 and "unknown format '.txt'" in err
    code, _, err = _run(["caption", str(tiny_checkpoint), str(album), "--resume"], capsys)
    assert code == 2 and "--resume continues an --output file" in err


def test_killed_run_resumes_with_every_image_exactly_once(tiny_checkpoint: Path, tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    photos = tmp_path / "photos"
    for i in range(23):
        _photo(photos / f"{i:03d}.png", (10 * i, 255 - 10 * i, (37 * i) % 256))
    argv = ["caption", str(tiny_checkpoint), str(photos), "--steps", "3", "--batch-size", "4"]
    reference = tmp_path / "reference.jsonl"
    assert _run([*argv, "--output", str(reference)], capsys)[0] == 0
    expected = [json.loads(line) for line in reference.read_text().splitlines()]

    output = tmp_path / "captions.jsonl"
    real_batch = Captioner._caption_batch
    calls = {"n": 0}

    def killed_after_three_batches(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # what Ctrl-C or a kill between batches looks like to the command
        return real_batch(self, *args, **kwargs)

    monkeypatch.setattr(Captioner, "_caption_batch", killed_after_three_batches)
    assert main([*argv, "--output", str(output)]) == 130
    err = capsys.readouterr().err
    partial = output.with_name(output.name + ".partial")
    assert "run the same command with --resume" in err
    assert not output.exists() and len(partial.read_text().splitlines()) == 12
    with partial.open("a") as f:
        f.write('{"path": "' + str(photos / "012.png"))  # a line torn by the kill: that image is captioned again
    monkeypatch.setattr(Captioner, "_caption_batch", real_batch)

    code, _, err = _run([*argv, "--output", str(output)], capsys)
    assert code == 2 and "interrupted run" in err and "--resume" in err  # never overwritten silently
    code, _, err = _run([*argv, "--output", str(output), "--resume"], capsys)
    assert code == 0 and "captioned 11, failed 0, already in" in err
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert records == expected  # each image once, in order, with the caption an uninterrupted run gives
    assert not partial.exists()

    # resuming a finished file adds only new images
    _photo(photos / "999.png")
    code, _, err = _run([*argv, "--output", str(output), "--resume"], capsys)
    assert code == 0 and "captioned 1, failed 0, already in" in err
    assert [json.loads(line)["path"] for line in output.read_text().splitlines()] == \
        [r["path"] for r in expected] + [str(photos / "999.png")]


def test_trajectory_output_records(tiny_checkpoint: Path, album: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "t.json"
    code, _, _ = _run(["caption", str(tiny_checkpoint), str(album / "a.png"), str(album / "broken.jpg"),
                       "--trajectory", "--steps", "3", "--output", str(output)], capsys)
    assert code == 1
    (record,) = json.loads(output.read_text())
    assert record["path"] == str(album / "a.png") and len(record["trajectory"]) == 3


# -- the Python API ------------------------------------------------------------------------------------------


def test_api_errors_raise_or_skip(tiny_checkpoint: Path, album: Path, caplog) -> None:
    captioner = Captioner.from_pretrained(tiny_checkpoint)
    images = [album / "a.png", album / "broken.jpg", album / "scan"]
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        captioner.caption(images, steps=3)
    with caplog.at_level("WARNING"):
        captions = captioner.caption(images, steps=3, seed=0, errors="skip")
    assert captions[1] is None and all(captions[k] for k in (0, 2))
    assert "broken.jpg" in caplog.text
    # the good images get the captions they get without the bad one in between
    assert captioner.caption([images[0]], steps=3, seed=0) == [captions[0]]
    with pytest.raises(ValueError, match="errors must be"):
        captioner.caption(images, errors="ignore")  # type: ignore[arg-type]
    results = list(captioner.caption_stream(images, steps=3, seed=0, batch_size=2))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].to_dict() == {"path": str(images[1]), "error": results[1].error}


# -- evaluate --------------------------------------------------------------------------------------------------


def test_evaluate_on_error(tiny_checkpoint: Path, shapes_jsonl: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    shutil.copytree(shapes_jsonl.parent, root)
    dev = sorted((root / "images").glob("dev_*.png"))
    dev[0].write_bytes(b"not an image")
    dev[1].unlink()
    argv = ["evaluate", str(tiny_checkpoint), "--dataset", "jsonl", "--root", str(root), "--split", "dev",
            "--steps", "3", "--cache-dir", str(tmp_path / "cache")]
    code, out, err = _run([*argv, "--on-error", "fail"], capsys)
    assert code == 2 and "2 of the 4 dev images cannot be read" in err
    assert f"{dev[0].name} (not a recognised image format)" in err and f"{dev[1].name} (file does not exist)" in err
    assert not (tmp_path / "cache").exists()  # refused before any work
    output = tmp_path / "eval.json"
    code, out, err = _run([*argv, "--output", str(output)], capsys)
    assert code == 0 and "warning: 2 of the 4 dev images could not be read" in err
    result = json.loads(output.read_text())
    assert result["num_images"] == 2 and sorted(result["skipped_reasons"]) == result["skipped_images"]
