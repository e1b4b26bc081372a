"""The expert compute registry and the kernel boundary, each against a plain reference."""

import pytest
import torch

from comoe.moe.experts import STRATEGIES, choose_strategy
from comoe.moe.kernels import grouped_matmul
from comoe.moe.routing import sort_by_expert


def test_built_in_strategies_are_registered_and_unknown_names_are_refused():
    assert {"blocks", "grouped"} <= set(STRATEGIES)
    with pytest.raises(ValueError, match="expert_compute='fused'.*valid: auto, blocks, grouped"):
        choose_strategy("fused", 4, 2)


@pytest.mark.parametrize(
    ("n", "k", "expected"), [(4, 2, "blocks"), (8, 2, "blocks"), (16, 2, "grouped"), (8, 1, "grouped")]
)
def test_auto_picks_blocks_up_to_a_ratio_of_four(n, k, expected):
    assert choose_strategy("auto", n, k) == expected
    assert choose_strategy("grouped", n, k) == "grouped"
    assert choose_strategy("auto", n, k, "cuda") == "blocks"  # fastest at every measured GPU shape


@pytest.mark.parametrize(("k_dim", "n_dim"), [(16, 8), (5, 3)])  # 16-byte aligned rows (grouped_mm) and not
def test_grouped_matmul_equals_one_matmul_per_group(k_dim, n_dim):
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 4, (30, 1), generator=g)
    indices[indices == 2] = 1  # expert 2 receives no rows
    pairs = sort_by_expert(indices, 4)
    a = torch.randn(30, k_dim, generator=g, requires_grad=True)
    b = torch.randn(4, k_dim, n_dim, generator=g, requires_grad=True)
    out = grouped_matmul(a, b, pairs.counts, pairs.offsets)
    experts = pairs.experts
    reference = torch.stack([a[row] @ b[experts[row]] for row in range(30)])
    torch.testing.assert_close(out, reference)
    grad = torch.randn(30, n_dim, generator=g)
    got = torch.autograd.grad(out, (a, b), grad)
    expected = torch.autograd.grad(reference, (a, b), grad)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert torch.equal(got[1][2], torch.zeros(k_dim, n_dim))
