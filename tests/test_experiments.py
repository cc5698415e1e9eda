"""diffcap sweep / compare: grids expand into named, validated variants; a tiny sweep runs and is compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffcap.config import ConfigError
from diffcap.experiments import (compare, expand, line_style, markdown_table, parse_grid, run_labels, summarize,
                                 sweep)


def test_grid_expands_to_the_product_named_by_differences() -> None:
    grid = parse_grid(["loss.rounding_weight=0.05,0.3", "diffusion.target=x0,x_prev"])
    variants = expand("default", grid, [])
    assert [v.name for v in variants] == ["rounding_weight=0.05", "target=x_prev,rounding_weight=0.05",
                                          "base", "target=x_prev"]
    assert variants[1].overrides == ["loss.rounding_weight=0.05", "diffusion.target=x_prev"]


def test_ambiguous_field_names_keep_their_section() -> None:
    variants = expand("default", parse_grid(["model.dropout=0.0", "text.max_length=16"]), ["train.seed=3"])
    assert variants[0].name == "dropout=0.0,max_length=16"


@pytest.mark.parametrize("item, message", [
    ("loss.rounding_wieght=0.1", "did you mean 'loss.rounding_weight'"),
    ("loss.distance=l3", "loss.distance"),
    ("loss.rounding_weight", "section.field=v1,v2"),
])
def test_bad_grids_fail_before_any_training(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        expand("default", parse_grid([item]), [])


def test_duplicate_variants_are_refused() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        expand("default", parse_grid(["train.lr=0.001,1e-3"]), [])


def test_dry_run_prints_one_train_and_evaluate_command_per_variant(capsys, tmp_path: Path) -> None:
    runs, failed = sweep("default", ["model.layers=2,4"], budget_minutes=15, out=tmp_path, dry_run=True,
                         eval_limit=100)
    lines = capsys.readouterr().out.splitlines()
    assert failed == [] and [r.name for r in runs] == ["layers=2", "layers=4"]
    assert lines[0].startswith("diffcap train default train.max_minutes=15 model.layers=2 --run-dir")
    assert lines[1].startswith(f"diffcap evaluate {tmp_path}/layers=2/checkpoint") and "--limit 100" in lines[1]
    assert len(lines) == 4 and not any(tmp_path.iterdir())  # nothing ran


def test_tiny_sweep_runs_each_variant_and_compare_reports_them(tmp_path: Path, shapes_jsonl: Path, tiny_config) -> None:
    config = tiny_config(shapes_jsonl, train__max_steps=6, train__log_every=2)
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"preset": "tiny", **json.loads(config.to_json())}))
    runs, failed = sweep(str(base), ["loss.distance=mse,l1"], budget_minutes=5, out=tmp_path / "sweep",
                         evaluate=False)
    assert failed == []
    assert [r.name for r in runs] == ["base", "distance=l1"]
    for run in runs:
        meta = json.loads((run / "checkpoint" / "meta.json").read_text())
        assert meta["step"] == 6 and meta["finished"]
    # a second sweep finds both done and trains nothing
    before = [(r / "checkpoint" / "meta.json").stat().st_mtime for r in runs]
    sweep(str(base), ["loss.distance=mse,l1"], budget_minutes=5, out=tmp_path / "sweep", evaluate=False)
    assert [(r / "checkpoint" / "meta.json").stat().st_mtime for r in runs] == before

    (runs[1] / "dev.json").write_text(json.dumps({"metrics": {"BLEU-4": 12.5, "METEOR": 15.0, "CIDEr": 31.0},
                                                  "num_images": 4}))
    table = markdown_table([summarize(r) for r in runs])
    # each run is described by what it changes against the base; the base is the reference
    assert "| base | (the reference) |" in table and "| distance=l1 | loss.distance=l1 |" in table
    assert "| 12.5 | 15.0 | 31.0 | 6 |" in table
    elapsed = json.loads((runs[1] / "checkpoint" / "train_state.json").read_text())["elapsed"]
    assert elapsed > 0 and summarize(runs[1]).minutes == elapsed / 60  # the run's own training time
    page = compare(runs, tmp_path / "cmp")
    assert (tmp_path / "cmp" / "losses.png").stat().st_size > 1000
    assert "losses.png" in page.read_text()


def test_runs_sharing_a_folder_name_are_labelled_by_their_path(tmp_path: Path) -> None:
    runs = [tmp_path / "abl" / "base", tmp_path / "abl" / "lr=0.001", tmp_path / "abl" / "other" / "base"]
    assert run_labels(runs) == ["base", "lr=0.001", "other/base"]
    assert run_labels(runs[:2]) == ["base", "lr=0.001"]


def test_line_styles_stay_distinct_beyond_ten_runs() -> None:
    styles = [tuple(sorted(line_style(i).items())) for i in range(40)]
    assert len(set(styles)) == 40
