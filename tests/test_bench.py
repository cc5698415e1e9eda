"""The benchmark suite keeps working: a tiny run produces every section of the table and the JSON (shapes, not timings)."""

from __future__ import annotations

import json
from pathlib import Path

from diffcap.bench import main


def test_tiny_benchmark_writes_every_section(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["--tiny", "--no-features", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["ceiling"]) == {"fp32", "bf16"} and all(v > 0 for v in result["ceiling"].values())
    for precision, figures in result["ceiling_shapes"].items():  # the ceiling is the best of the model's shapes
        assert "rounding head" in figures and result["ceiling"][precision] == max(figures.values())
    sampling = result["sampling"]
    assert {(r["batch"], r["steps"], r["guidance"]) for r in sampling} == {
        (b, n, w) for b in (1, 4) for n in (1, 2) for w in (0.0, 1.0)}
    for r in sampling:
        assert r["ms_per_caption"] > 0 and r["captions_per_s"] > 0 and 0 < r["fraction_of_ceiling"]
    assert {(r["batch"], r["beam_size"]) for r in result["autoregressive"]} == {(1, 1), (1, 3), (4, 1), (4, 3)}
    assert result["ratios"]["latency_diffusion_over_ar_greedy_batch1"] > 0
    assert result["training"]["samples_per_s"] > 0 and result["training"]["fraction_of_ceiling"] > 0
    table = capsys.readouterr().out
    assert "ceiling" in table and "training:" in table and "AR beam=3" in table


def test_levers_are_timed_off_and_on(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["--tiny", "--no-features", "--levers", "--no-compile", "--out", str(out)]) == 0
    levers = json.loads(out.read_text())["levers"]
    settings = {(r["lever"], r["setting"]) for r in levers}
    assert {("precision", "fp32"), ("precision", "bf16"), ("image condition", "every step"),
            ("image condition", "once per call"), ("training precision", "fp32"),
            ("training precision", "bf16"), ("training: rounding head", "fp32"),
            ("training: rounding head", "train"), ("training: dropout+attention", "pytorch"),
            ("training: dropout+attention", "diffcap ops"), ("training: noise levels", "1 per caption"),
            ("training: noise levels", "4 per caption")} <= settings
    assert all(r.get("captions_per_s", r.get("samples_per_s", 0)) > 0 for r in levers)
    assert "levers (one at a time)" in capsys.readouterr().out


def test_the_pytorch_ops_context_swaps_the_blocks_dropout_and_attention_and_restores_them() -> None:
    import torch.nn.functional as F

    from diffcap.bench import pytorch_dropout_and_attention
    from diffcap.models import autoregressive, denoiser, ops

    with pytorch_dropout_and_attention():
        assert denoiser.dropout is F.dropout and autoregressive.dropout is F.dropout
        assert denoiser.attention is not ops.attention
    assert denoiser.dropout is ops.dropout and denoiser.attention is ops.attention
    assert autoregressive.dropout is ops.dropout


def _evaluation(path: Path, checkpoint: Path, cider: float, **fields) -> Path:
    record = {"checkpoint": str(checkpoint), "split": "dev", "num_images": 10, "steps": 20, "beam_size": 1,
              "candidates": 1, "guidance": 0.0, "metrics": {"CIDEr": cider}, **fields}
    path.write_text(json.dumps(record))
    return path


def test_quality_match_finds_the_first_step_count_reaching_ar_greedy(tmp_path: Path) -> None:
    from diffcap.bench import quality_match

    diff, ar = tmp_path / "diff", tmp_path / "ar"
    files = [_evaluation(tmp_path / "ar.json", ar, 40.0)] + [
        _evaluation(tmp_path / f"d{n}.json", diff, c, steps=n) for n, c in ((1, 20.0), (5, 40.5), (10, 39.0))]
    q = quality_match(files, diff, ar)
    assert q["matched_steps"] == 5 and q["ar_greedy"] == 40.0
    assert q["diffusion_by_steps"] == {1: 20.0, 5: 40.5, 10: 39.0}
    # no step count reaches a stronger baseline: None, not the best one
    (tmp_path / "ar.json").write_text((tmp_path / "ar.json").read_text().replace("40.0", "41.0"))
    assert quality_match(files, diff, ar)["matched_steps"] is None


def test_quality_match_refuses_evaluations_that_do_not_compare(tmp_path: Path) -> None:
    import pytest

    from diffcap.bench import quality_match

    diff, ar = tmp_path / "diff", tmp_path / "ar"
    greedy = _evaluation(tmp_path / "ar.json", ar, 40.0)
    cases = {
        "different images": [greedy, _evaluation(tmp_path / "a.json", diff, 41.0, num_images=250)],
        "greedy": [_evaluation(tmp_path / "b.json", ar, 40.0, beam_size=3), _evaluation(tmp_path / "c.json", diff, 1.0)],
        "unguided": [greedy, _evaluation(tmp_path / "d.json", diff, 41.0, guidance=1.0)],
        "second evaluation": [greedy, _evaluation(tmp_path / "e.json", diff, 1.0),
                              _evaluation(tmp_path / "f.json", diff, 2.0)],
        "neither": [greedy, _evaluation(tmp_path / "g.json", tmp_path / "other", 1.0)],
        "needs a greedy evaluation": [_evaluation(tmp_path / "h.json", diff, 1.0)],
    }
    for message, files in cases.items():
        with pytest.raises(ValueError, match=message):
            quality_match(files, diff, ar)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a `diffcap evaluate --output` file"):
        quality_match([greedy, tmp_path / "bad.json"], diff, ar)


def test_quality_needs_the_ar_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["--quality", str(tmp_path / "x.json")]) == 2
    assert "--ar-checkpoint" in capsys.readouterr().err
