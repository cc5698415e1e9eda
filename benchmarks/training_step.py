"""Time one batch-64 training step in three settings, in alternating rounds so all see the same machine noise:
the rounding head in fp32 with PyTorch's dropout and SDPA; the head in the training precision (bf16), same ops;
the bf16 head with models/ops.py's packed dropout masks and explicit attention (today's default); with
`--levels K`, also today's step with K noise levels per caption and 64 / K captions (the "sample size" trick, the
same 64 samples). Optionally profile today's step.

    python benchmarks/training_step.py [--checkpoint DIR] [--rounds 5] [--repeats 5] [--levels K] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from diffcap.app import DEFAULT_CHECKPOINT
from diffcap.bench import (bench_training, matmul_ceiling, model_matmuls, pytorch_dropout_and_attention,
                           training_step, with_settings)
from diffcap.pipeline import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--levels", type=int, default=0, help="also time K noise levels per caption x 64 / K captions")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's table for 3 bf16 steps")
    args = p.parse_args()
    device = torch.device("cpu")
    model, _ = load_model(args.checkpoint)
    model.denoiser.float()
    s = model.denoiser.shape
    shapes = model_matmuls(model, 64 * (s.prefix_length + s.max_length))
    ceiling, _ = matmul_ceiling(shapes, device)
    print("ceiling before (GFLOP/s):", {k: round(v) for k, v in ceiling.items()})
    heads = {rp: with_settings(model, "loss", rounding_precision=rp) for rp in ("fp32", "train")}
    variants = {"fp32 head, pytorch ops": (heads["fp32"], True, 64), "bf16 head, pytorch ops": (heads["train"], True, 64),
                "bf16 head, diffcap ops": (heads["train"], False, 64)}
    if args.levels > 1:
        levels = with_settings(heads["train"], "train", samples_per_caption=args.levels)
        variants[f"bf16 head, diffcap ops, {args.levels} noise levels x {64 // args.levels} captions"] = (
            levels, False, 64 // args.levels)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (variant, pytorch_ops, captions) in variants.items():
            with pytorch_dropout_and_attention() if pytorch_ops else contextlib.nullcontext():
                runs[name].append(bench_training(variant, device, ceiling, batch=captions, repeats=args.repeats,
                                                 epoch_captions=None))
    print("ceiling after (GFLOP/s):", {k: round(v) for k, v in matmul_ceiling(shapes, device)[0].items()})
    for name, rows in runs.items():
        speeds = [r["samples_per_s"] for r in rows]
        fraction = statistics.median(r["fraction_of_ceiling"] for r in rows)
        print(f"{name}: samples/s per round {[round(v) for v in speeds]}, median "
              f"{statistics.median(speeds):.1f} = {fraction:.0%} of the bf16 ceiling")
    if args.profile:
        step = training_step(heads["train"], device, batch=64)
        for _ in range(3):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
