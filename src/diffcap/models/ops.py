"""Dropout and attention for training on a CPU, where PyTorch's defaults are slow at our shapes.

- `dropout`: PyTorch draws one 32-bit random number per element (`bernoulli_`, about 4 ns each here): the masks
  of a batch-64 step were 15 % of its time. We draw 64-bit numbers and use each as four 16-bit uniforms, so a
  mask costs a quarter of the draws; an element is dropped with probability round(p * 65536) / 65536 (within
  1e-5 of p) and the kept ones are scaled by 1 / (1 - p), as `F.dropout` does. It uses the global generator, so
  `torch.manual_seed` makes it reproducible.
- `attention`: with gradients, SDPA either falls back to its unfused "math" path in fp32 (dropout > 0) or runs
  the fused CPU kernel, whose backward is slow at our lengths (≈ 35 positions, head size 32). The explicit
  softmax(QKᵀ/√d)·V, with the matmuls in the autocast precision, our dropout on the weights and the softmax in
  fp32, made a bf16 training step 1.2× faster (BENCHMARKS.md). Without gradients (sampling) SDPA is as fast.

Both are CPU measures: on a GPU, PyTorch's fused kernels (Philox dropout, flash attention) are used as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with masks drawn four elements per 64-bit random number (module docstring)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    uniform16 = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    keep = uniform16 >= round(p * 65536) - 32768
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, p: float = 0.0, causal: bool = False,
              training: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / √d + causal mask) v over (B, heads, N, d) tensors, with dropout `p` on the weights when
    `training`: spelled out on a CPU in training (module docstring), SDPA otherwise."""
    p = p if training else 0.0
    if not training or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        N, M = scores.shape[-2:]
        future = torch.ones(N, M, dtype=torch.bool, device=q.device).triu(1)  # SDPA's is_causal: j > i masked
        scores = scores.masked_fill(future, float("-inf"))
    weights = dropout(torch.softmax(scores.float(), dim=-1), p)
    return weights.to(v.dtype) @ v
