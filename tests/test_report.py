"""`diffcap report RUN_DIR` on a tiny run made here: figures, report.json and a self-contained HTML page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from diffcap.cli import main
from diffcap.report import build_report, read_evals, read_scalars


@pytest.fixture(scope="module")
def tiny_run(shapes_jsonl: Path, tiny_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny training run with TensorBoard events and dev evaluations at steps 10 and 20 (and the final one)."""
    from diffcap.train import train

    config = tiny_config(shapes_jsonl, data__eval_split="dev", train__eval_every=10, train__eval_limit=4,
                         train__max_steps=20, train__log_every=5, train__max_minutes=60)  # steps, not time
    run_dir = tmp_path_factory.mktemp("report-run") / "run"
    train(config, run_dir, progress=False)
    return run_dir


def _is_png(path: Path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_report_of_a_tiny_run(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    page = build_report(tiny_run, out, steps=[1, 2], limit=4, gallery=3, trajectories=2, progress=False)
    assert page == out / "index.html"
    for name in ("losses", "dev_metrics", "steps_sweep", "trajectories"):
        assert _is_png(out / f"{name}.png"), name

    report = json.loads((out / "report.json").read_text())
    assert {"train/loss", "train/x_t", "train/rounding", "train/token_accuracy", "train/lr"} <= set(report["losses"])
    assert [row["step"] for row in report["dev_history"]] == [10, 20, 20]  # periodic, periodic, final
    assert [row["steps"] for row in report["sweep"]] == [1, 2]
    assert all("CIDEr" in row["metrics"] and row["captions_per_second"] > 0 for row in report["sweep"])
    assert report["split"] == "dev" and report["images"] == 4 and report["step"] == 20
    gallery = report["gallery"]
    assert len(gallery) == 3 and all(g["references"] and isinstance(g["caption"], str) for g in gallery)
    # each trajectory ends in the caption the gallery shows for that image, after the checkpoint's sampling steps
    assert [t["image"] for t in report["trajectories"]] == [g["image"] for g in gallery[:2]]
    for trajectory, shown in zip(report["trajectories"], gallery):
        assert len(trajectory["steps"]) == 10 and trajectory["steps"][-1]["t"] == 0
        assert trajectory["steps"][-1]["caption"] == shown["caption"]

    text = page.read_text()
    assert text.count("data:image/png;base64,") == 4  # the four figures, inlined
    assert text.count("data:image/jpeg;base64,") == 3  # the gallery's pictures
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "the page must not load anything from outside"
    for reference in gallery[0]["references"]:
        assert reference in text


def test_report_cli_without_the_sweep(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    assert main(["report", str(tiny_run), "--out", str(out), "--no-sweep", "--limit", "2", "--trajectories", "1"]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["sweep"] == [] and len(report["gallery"]) == 2 and len(report["trajectories"]) == 1
    assert not (out / "steps_sweep.png").exists()
    assert "Not measured" in (out / "index.html").read_text()


def test_report_of_a_run_without_checkpoint_or_events(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "evals.jsonl").write_text('{"step": 5, "elapsed": 60.0, "BLEU-4": 1.5, "CIDEr": 3.0}\n{"step": 10, "elap')
    page = build_report(run, progress=False)
    assert page == run / "report" / "index.html"
    text = page.read_text()
    assert "no checkpoint in" in text and "no TensorBoard events" in text
    assert _is_png(run / "report" / "dev_metrics.png") and not (run / "report" / "losses.png").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "error: run directory" in capsys.readouterr().err


def test_scalars_of_a_resumed_run_are_merged(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for steps, value in ((range(0, 30, 10), 1.0), (range(20, 50, 10), 2.0)):  # the second run resumed at 20
        writer = SummaryWriter(str(tmp_path / "tb"))
        for step in steps:
            writer.add_scalar("train/loss", value, step)
        writer.close()
    assert read_scalars(tmp_path / "tb") == {"train/loss": [(0, 1.0), (10, 1.0), (20, 2.0), (30, 2.0), (40, 2.0)]}
    assert read_scalars(tmp_path / "nothing") == {}
    assert read_evals(tmp_path / "nothing.jsonl") == []
