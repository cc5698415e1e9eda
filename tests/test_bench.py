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
            ("training: dropout+attention", "diffcap ops")} <= settings
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
