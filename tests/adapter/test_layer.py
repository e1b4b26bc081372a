"""The fast expert paths (blocks, grouped) against a plain dense reference: outputs and all gradients."""

import pytest
import torch
from torch import nn

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import ComoeConfig
from tests.helpers import dense_reference, grads, make_layer

CASES = [  # d_in, d_out, n, k, r
    (16, 24, 2, 1, 4),
    (32, 16, 4, 2, 8),
    (24, 40, 8, 2, 4),
    (20, 12, 8, 3, 2),
    (16, 16, 16, 2, 4),
]


@pytest.mark.parametrize("strategy", ["blocks", "grouped"])
@pytest.mark.parametrize(("d_in", "d_out", "n", "k", "r"), CASES)
def test_fast_path_equals_dense_reference_fp32(strategy, d_in, d_out, n, k, r):
    layer = make_layer(d_in, d_out, n, k, r, strategy)
    x = torch.randn(3, 7, d_in, requires_grad=True)
    out = layer(x)
    ref = dense_reference(layer, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for fast, slow in zip(grads(layer, x, out), grads(layer, x, ref), strict=True):
        torch.testing.assert_close(fast.double(), slow.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["blocks", "grouped"])
def test_soft_routing_equals_reference(strategy):
    layer = make_layer(16, 24, 4, 2, 4, strategy, routing="soft")
    x = torch.randn(5, 16, requires_grad=True)
    out, ref = layer(x), dense_reference(layer, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for fast, slow in zip(grads(layer, x, out), grads(layer, x, ref), strict=True):
        torch.testing.assert_close(fast.double(), slow.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["blocks", "grouped"])
def test_experts_without_tokens_get_zero_gradient(strategy):
    layer = make_layer(12, 10, 6, 2, 4, strategy)
    with torch.no_grad():  # positive inputs and strongly negative rows: experts 4 and 5 are never chosen
        layer.router.weight[4:] = -5.0
        layer.router.weight[:4].uniform_(0.0, 1.0)
    x = torch.rand(9, 12, requires_grad=True)
    out = layer(x)
    ref = dense_reference(layer, x)
    fast, slow = grads(layer, x, out), grads(layer, x, ref)
    assert torch.all(fast[3][4:] == 0) and torch.all(fast[2][4:] == 0)
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(f.double(), s.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["blocks", "grouped"])
def test_bfloat16_close_to_reference(strategy):
    layer = make_layer(32, 24, 4, 2, 8, strategy, dtype=torch.bfloat16)
    x = torch.randn(4, 6, 32, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = dense_reference(layer, x)
    scale = ref.abs().max()
    assert (out.double() - ref).abs().max() / scale < 2e-2
    for fast, slow in zip(grads(layer, x, out), grads(layer, x, ref), strict=True):
        assert (fast.double() - slow.double()).abs().max() / slow.double().abs().max() < 5e-2


def test_strategies_agree_with_each_other():
    x = torch.randn(50, 24)
    blocks = make_layer(24, 40, 8, 2, 4, "blocks")(x)
    grouped = make_layer(24, 40, 8, 2, 4, "grouped")(x)
    torch.testing.assert_close(blocks, grouped, rtol=1e-5, atol=1e-5)


def test_zero_B_returns_base_output_exactly():
    base = nn.Linear(16, 8)
    layer = ComoeLinear(base, ComoeConfig(num_experts=4, top_k=2, r=4), ComoeContext())
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), base(x))


def test_rejects_non_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        ComoeLinear(nn.Conv1d(3, 3, 1), ComoeConfig(), ComoeContext())
