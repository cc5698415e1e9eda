"""What the model's own score (`sample.self_weight`) costs next to sampling, in one process on the same inputs:
one batch of 64 feature rows (random, fixed seed), 20 steps, timed for one sample, 4 candidates chosen by the
matcher, 4 chosen by the matcher less the own score, and the own score of 256 captions alone.

    python benchmarks/self_score_cost.py [CHECKPOINT] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from diffcap.models.denoiser import ImageFeatures
from diffcap.pipeline import denoising_cross_entropy, generate, load_model

T = TypeVar("T")


def timed(label: str, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - start:.2f} s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default="src/diffcap/assets/checkpoint")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_model(Path(args.checkpoint))
    shape, g, B = model.denoiser.shape, torch.Generator().manual_seed(0), 64
    image = ImageFeatures(torch.randn(B, shape.pooled_dim, generator=g).abs(),
                          torch.randn(B, meta["encoder"]["grid_size"] ** 2, shape.grid_dim, generator=g).abs())
    generate(model, image, candidates=1)  # warm-up
    one = timed("one sample, batch 64, 20 steps", lambda: generate(model, image, candidates=1))
    timed("4 candidates, matcher", lambda: generate(model, image, candidates=4, select="match", self_weight=0.0))
    timed("4 candidates, matcher - 0.35 x own score",
          lambda: generate(model, image, candidates=4, select="match", self_weight=0.35))
    timed("own score of 256 captions alone",
          lambda: denoising_cross_entropy(model, image.repeat(4), one.captions * 4, list(range(4 * B))))


if __name__ == "__main__":
    main()
