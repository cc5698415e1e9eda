"""CLI smoke tests: `diffcap.cli.main([...])` in-process, on tiny synthetic data and one shared tiny checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from diffcap.cli import main
from diffcap.metrics import METRIC_NAMES

from conftest import write_test_only_flickr8k

FAST = [f"{key}={value}" for key, value in {
    "text.max_length": 12, "model.layers": 1, "train.batch_size": 8, "train.warmup_steps": 2, "train.max_steps": 3,
    "train.save_every": 1000, "data.dataset": "jsonl", "data.eval_split": "",
}.items()]


def _dev_images(shapes_jsonl: Path) -> list[str]:
    return [str(p) for p in sorted((shapes_jsonl.parent / "images").glob("dev_*.png"))]


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI expecting a known error: exit code 2 and a single 'error: ...' line last on stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


# -- commands that work -----------------------------------------------------------------------------------------


def test_features(shapes_jsonl: Path, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    assert main(["features", "--dataset", "jsonl", "--root", str(shapes_jsonl.parent), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"train: 8 images cached in {cache / 'train'}" in out
    assert f"dev: 4 images cached in {cache / 'dev'}" in out
    meta = json.loads((cache / "dev" / "meta.json").read_text())
    assert len(meta["keys"]) == 4 and meta["identity"]["encoder"] == "efficientnet_lite0"


def test_train_tiny(shapes_jsonl: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    argv = ["train", "tiny", *FAST, f"data.root={shapes_jsonl}", f"data.cache_dir={tmp_path / 'cache'}",
            "--run-dir", str(run_dir)]
    assert main(argv) == 0
    assert f"checkpoint: {run_dir / 'checkpoint'}" in capsys.readouterr().out
    names = {p.name for p in (run_dir / "checkpoint").iterdir()}
    assert {"config.json", "meta.json", "model.safetensors", "train_state.json", "train_state.safetensors"} <= names
    assert json.loads((run_dir / "checkpoint" / "meta.json").read_text())["step"] == 3
    assert json.loads((run_dir / "config.json").read_text())["model"]["layers"] == 1

    # a second run into the same directory needs --resume
    assert "--resume" in _error_line(capsys, argv)
    argv[argv.index("train.max_steps=3")] = "train.max_steps=5"
    assert main(argv + ["--resume"]) == 0
    assert json.loads((run_dir / "checkpoint" / "meta.json").read_text())["step"] == 5


def test_caption_prints_one_line_per_image(tiny_checkpoint: Path, shapes_jsonl: Path, capsys) -> None:
    images = _dev_images(shapes_jsonl)[:3]
    assert main(["caption", str(tiny_checkpoint), *images, "--seed", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert [line.split("\t")[0] for line in lines] == images
    assert all(len(line.split("\t")) == 2 for line in lines)

    assert main(["caption", str(tiny_checkpoint), images[0], "--seed", "1", "--steps", "4"]) == 0
    single = capsys.readouterr().out.splitlines()
    assert len(single) == 1 and "\t" not in single[0]  # one image: just the caption


def test_caption_trajectory(tiny_checkpoint: Path, shapes_jsonl: Path, capsys) -> None:
    image = _dev_images(shapes_jsonl)[0]
    assert main(["caption", str(tiny_checkpoint), image, "--trajectory", "--steps", "5", "--seed", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{image}:"
    assert len(lines) == 1 + 5
    assert all(line.lstrip().startswith("t=") for line in lines[1:])
    assert lines[-1].lstrip().startswith("t=   0")


def test_evaluate_writes_json(tiny_checkpoint: Path, shapes_jsonl: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "out" / "eval.json"
    argv = ["evaluate", str(tiny_checkpoint), "--dataset", "jsonl", "--root", str(shapes_jsonl.parent),
            "--split", "dev", "--cache-dir", str(tmp_path / "cache"), "--steps", "4", "--output", str(output)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "BLEU-4" in out and f"wrote {output}" in out
    result = json.loads(output.read_text())
    metrics = result["metrics"]
    if shutil.which("java"):
        assert set(metrics) == set(METRIC_NAMES)
    else:  # METEOR needs Java; without it the report says why
        assert set(metrics) == set(METRIC_NAMES) - {"METEOR"} and "METEOR" in result["unavailable"]
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert "SPICE" in result["unavailable"]
    keys = [Path(p).relative_to(shapes_jsonl.parent).as_posix() for p in _dev_images(shapes_jsonl)]
    assert [c["image"] for c in result["captions"]] == keys
    assert all(isinstance(c["caption"], str) for c in result["captions"])
    assert result["num_images"] == 4 and result["split"] == "dev" and result["steps"] == 4
    assert result["solver"] == "ddim"  # the checkpoint's default, recorded with the scores


def test_evaluate_solver_flag_reaches_the_sampler(tiny_checkpoint: Path, shapes_jsonl: Path, tmp_path: Path,
                                                  monkeypatch) -> None:
    from diffcap.diffusion.gaussian import GaussianDiffusion

    used = []
    step = GaussianDiffusion.dpmpp_2m_step
    monkeypatch.setattr(GaussianDiffusion, "dpmpp_2m_step", lambda self, *a: used.append(1) or step(self, *a))
    output = tmp_path / "eval.json"
    assert main(["evaluate", str(tiny_checkpoint), "--dataset", "jsonl", "--root", str(shapes_jsonl.parent),
                 "--split", "dev", "--cache-dir", str(tmp_path / "cache"), "--steps", "4", "--solver", "dpmpp_2m",
                 "--output", str(output)]) == 0
    assert json.loads(output.read_text())["solver"] == "dpmpp_2m" and used


def test_evaluate_refuses_training_images(tiny_checkpoint: Path, shapes_jsonl: Path, tmp_path: Path, capsys) -> None:
    argv = ["evaluate", str(tiny_checkpoint), "--dataset", "jsonl", "--root", str(shapes_jsonl.parent),
            "--split", "train", "--limit", "2", "--steps", "2", "--cache-dir", str(tmp_path / "cache")]
    line = _error_line(capsys, argv)
    assert "2 of the 2 train images were training images" in line and "--allow-training-images" in line
    output = tmp_path / "train.json"
    assert main([*argv, "--allow-training-images", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["training_images_evaluated"] == 2


# -- clear errors: exit code 2, one line, no traceback ----------------------------------------------------------


def test_error_missing_checkpoint(tmp_path: Path, shapes_jsonl: Path, capsys) -> None:
    line = _error_line(capsys, ["caption", str(tmp_path / "nope"), _dev_images(shapes_jsonl)[0]])
    assert "does not exist" in line and "nope" in line


@pytest.mark.parametrize("layout", ["pickle-named-safetensors", "pytorch-bin"])
def test_error_pickled_checkpoint(tiny_checkpoint: Path, shapes_jsonl: Path, tmp_path: Path, capsys,
                                  layout: str) -> None:
    import torch

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    from safetensors.torch import load_file

    tensors = load_file(str(bad / "model.safetensors"))
    (bad / "model.safetensors").unlink()
    if layout == "pickle-named-safetensors":
        torch.save(tensors, bad / "model.safetensors")  # a pickle under the safetensors name
    else:
        torch.save(tensors, bad / "pytorch_model.bin")
    line = _error_line(capsys, ["caption", str(bad), _dev_images(shapes_jsonl)[0]])
    assert "model.safetensors" in line
    if layout == "pickle-named-safetensors":
        assert "never loads pickled" in line


def test_error_unknown_config_key(tmp_path: Path, capsys) -> None:
    line = _error_line(capsys, ["train", "tiny", "trian.lr=1e-3", "--run-dir", str(tmp_path / "run")])
    assert "'trian.lr'" in line and "did you mean 'train.lr'" in line
    line = _error_line(capsys, ["train", "tiny", "train.bach_size=4", "--run-dir", str(tmp_path / "run")])
    assert "did you mean 'train.batch_size'" in line
    line = _error_line(capsys, ["train", "tiny", "model.layer=2", "--run-dir", str(tmp_path / "run")])
    assert "did you mean 'model.layers'" in line
    assert not (tmp_path / "run").exists()


def test_error_corrupt_image(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """A file that cannot be captioned: one 'failed: PATH: reason' line and a summary, exit code 1."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    for bad in (broken, text):
        assert main(["caption", str(tiny_checkpoint), str(bad)]) == 1
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert captured.out == "" and "Traceback" not in captured.err
        assert lines[0].startswith(f"failed: {bad}: ") and lines[-1].startswith("captioned 0, failed 1")


def test_error_dataset_root_missing(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-dataset"
    line = _error_line(capsys, ["features", "--dataset", "jsonl", "--root", str(missing),
                                "--cache-dir", str(tmp_path / "cache")])
    assert str(missing) in line and "does not exist" in line
    line = _error_line(capsys, ["evaluate", str(tiny_checkpoint), "--dataset", "flickr8k", "--root", str(missing),
                                "--cache-dir", str(tmp_path / "cache")])
    assert str(missing) in line and "does not exist" in line


def test_error_split_not_available(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    root = tmp_path / "flickr8k"
    (root / "images").mkdir(parents=True)
    tokens = []
    for i, split in enumerate(["train", "train", "dev"]):
        name = f"{i}.jpg"
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(root / "images" / name)
        tokens += [f"{name}#0\ta photo number {i}", f"{name}#1\tanother photo {i}"]
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("0.jpg\n1.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("2.jpg\n")  # no Flickr_8k.testImages.txt
    line = _error_line(capsys, ["evaluate", str(tiny_checkpoint), "--dataset", "flickr8k", "--root", str(root),
                                "--split", "test", "--cache-dir", str(tmp_path / "cache")])
    assert "split 'test' is not available" in line and "Flickr_8k.testImages.txt" in line
    assert "available: train, dev" in line
    line = _error_line(capsys, ["features", "--dataset", "flickr8k", "--root", str(root), "--split", "test",
                                "--cache-dir", str(tmp_path / "cache")])
    assert "split 'test' is not available" in line
    assert not (tmp_path / "cache" / "test").exists()


def test_evaluate_on_a_folder_holding_only_the_test_split(tiny_checkpoint: Path, shapes_jsonl: Path, tmp_path: Path,
                                                          capsys) -> None:
    """What an independent evaluator has: images + Flickr8k.token.txt + Flickr_8k.testImages.txt, nothing else."""
    root = tmp_path / "heldout"
    names = write_test_only_flickr8k(root, sorted((shapes_jsonl.parent / "images").glob("dev_*.png")))
    output = tmp_path / "test.json"
    assert main(["evaluate", str(tiny_checkpoint), "--dataset", "flickr8k", "--root", str(root), "--split", "test",
                 "--cache-dir", str(tmp_path / "cache"), "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["split"] == "test" and len(result["captions"]) == len(names)
    assert {c["image"] for c in result["captions"]} == set(names)


def test_caption_without_a_checkpoint_uses_the_shipped_one(tiny_checkpoint: Path, shapes_jsonl: Path, capsys,
                                                           monkeypatch) -> None:
    import diffcap.app

    image = str(sorted((shapes_jsonl.parent / "images").glob("dev_*.png"))[0])
    assert main(["caption", str(tiny_checkpoint), image, "--seed", "1"]) == 0
    named = capsys.readouterr().out
    monkeypatch.setattr(diffcap.app, "DEFAULT_CHECKPOINT", tiny_checkpoint)
    assert main(["caption", image, "--seed", "1"]) == 0
    assert capsys.readouterr().out == named
    monkeypatch.setattr(diffcap.app, "DEFAULT_CHECKPOINT", tiny_checkpoint.parent / "nothing-here")
    assert main(["caption", image]) == 2
    assert "ships no default checkpoint" in capsys.readouterr().err
    assert main(["caption", str(tiny_checkpoint)]) == 2
    assert "no image to caption" in capsys.readouterr().err
