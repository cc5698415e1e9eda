"""The training-speed dropout and attention (models/ops.py) keep the semantics of F.dropout and SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcap.models.ops import attention, dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_with_probability_p_and_keeps_the_expectation(p: float) -> None:
    torch.manual_seed(0)
    y = dropout(torch.ones(400_000), p)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.01


def test_dropout_lanes_are_independent() -> None:
    """Four elements share a 64-bit draw: neighbours must still be dropped independently (P(both) = p²)."""
    torch.manual_seed(1)
    dropped = dropout(torch.ones(800_000), 0.5) == 0
    both = (dropped[0::2] & dropped[1::2]).float().mean().item()
    assert abs(both - 0.25) < 0.005
    quads = dropped.view(-1, 4).sum(1).bincount(minlength=5).float() / (800_000 / 4)
    assert torch.allclose(quads, torch.tensor([1, 4, 6, 4, 1]) / 16, atol=0.005)  # binomial(4, 0.5)


def test_dropout_is_identity_in_eval_and_reproducible_with_the_seed() -> None:
    x = torch.randn(3, 5, 7)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, dropout(x, 0.3))
    with pytest.raises(ValueError, match="must be in"):
        dropout(x, 1.0)


def test_dropout_gradient_is_the_mask_scaled() -> None:
    x = torch.randn(10_001, requires_grad=True)  # not a multiple of 4
    y = dropout(x, 0.2)
    y.sum().backward()
    kept = y.detach() != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 1.25)) and (x.grad[~kept] == 0).all()


def test_dropout_keeps_dtype_and_shape() -> None:
    x = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    y = dropout(x, 0.1)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_matches_sdpa(causal: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, requires_grad=True) for _ in range(3))
    ours = attention(q, k, v, causal=causal, training=True)  # p = 0: only the explicit product differs
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.equal(attention(q, k, v, p=0.5, causal=causal), ref)  # not training: SDPA, no dropout
    (g_ours,) = torch.autograd.grad(ours.square().sum(), q)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), q)
    assert torch.allclose(g_ours, g_ref, atol=1e-4)


def test_explicit_attention_dropout_drops_weights() -> None:
    torch.manual_seed(0)
    q, k = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 1000, 8)
    v = torch.ones(1, 1, 1000, 8)  # uniform weights 1/1000: the output is the kept share, rescaled
    out = attention(q, k, v, p=0.5, training=True)
    assert not torch.allclose(out, torch.ones_like(out))  # something was dropped
    assert abs(out.mean().item() - 1.0) < 0.05


def test_explicit_attention_under_bf16_autocast_is_close_to_fp32() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 35, 32) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, training=True)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), F.scaled_dot_product_attention(q, k, v), atol=0.05)


def test_other_devices_use_pytorchs_fused_kernels() -> None:
    """The packed masks and the explicit product are CPU measures; elsewhere (a GPU) PyTorch's own run."""
    from unittest import mock

    x = torch.empty(2, 4, 9, 8, device="meta")
    with mock.patch("diffcap.models.ops.F.dropout", wraps=F.dropout) as drop:
        assert dropout(x, 0.1).device.type == "meta"
    drop.assert_called_once()
    with mock.patch("diffcap.models.ops.F.scaled_dot_product_attention",
                    wraps=F.scaled_dot_product_attention) as sdpa:
        assert attention(x, x, x, p=0.1, training=True).shape == x.shape
    assert sdpa.call_args.kwargs["dropout_p"] == 0.1
