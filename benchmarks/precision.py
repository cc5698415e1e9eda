"""Whether bf16 pays on this machine: the denoiser's matmul shapes (batch 64) timed in fp32 and in bf16, whether
the hardware multiplies bf16 natively, and what `train.precision=auto` picks here.

    python benchmarks/precision.py [--checkpoint DIR] [--repeats 10]
"""

from __future__ import annotations

import argparse
import platform

import torch

from diffcap.app import DEFAULT_CHECKPOINT
from diffcap.bench import matmul_ceiling, model_matmuls
from diffcap.pipeline import load_model
from diffcap.train import native_bf16, resolve_precision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cpu")
    model, _ = load_model(args.checkpoint)
    s = model.denoiser.shape
    ceiling, per_shape = matmul_ceiling(model_matmuls(model, 64 * (s.prefix_length + s.max_length)), device,
                                        repeats=args.repeats)
    print(f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"native bf16 matmuls: {native_bf16(device)}; train.precision=auto -> {resolve_precision('auto', device)}")
    for label in per_shape["fp32"]:
        fp32, bf16 = per_shape["fp32"][label], per_shape["bf16"][label]
        print(f"  {label:22s} fp32 {fp32:7.1f}  bf16 {bf16:7.1f} GFLOP/s  (bf16/fp32 {bf16 / fp32:.2f})")
    print(f"ceiling: fp32 {ceiling['fp32']:.0f}, bf16 {ceiling['bf16']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
