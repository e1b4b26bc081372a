"""The expert compute registry and the kernel boundary, each against a plain reference."""

import pytest
import torch

from comoe.moe.experts import STRATEGIES, choose_strategy
from comoe.moe.kernels import grouped_matmul
from comoe.moe.routing import sort_by_expert
from comoe.moe.triton_mix import triton_runs_on


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
    # blocks: fastest torch strategy at every measured GPU shape; the fused Triton kernel where installed
    assert choose_strategy("auto", n, k, "cuda") == ("triton" if triton_runs_on("cuda") else "blocks")


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


def test_a_registered_strategy_is_what_auto_chooses_where_it_prefers_the_shape():
    """The strategy seam: a toy strategy registered here (no other module edited) that auto picks on CPU
    for n = 8; the model then computes through it, exactly as blocks does."""
    from comoe import ComoeConfig, get_comoe_model
    from comoe.moe.experts import MixStrategy, mix_blocks, register_strategy, unregister_strategy
    from tests.helpers import tiny_llama

    calls = []

    def counted(z, routing, lora_B, scaling):
        calls.append(z.shape[0])
        return mix_blocks(z, routing, lora_B, scaling)

    register_strategy(MixStrategy("toy", counted, lambda device, n, k: 9.0 if device == "cpu" and n == 8 else 0))
    try:
        assert choose_strategy("auto", 8, 2) == "toy"
        assert choose_strategy("auto", 4, 2) == "blocks" and choose_strategy("auto", 8, 2, "cuda") != "toy"
        ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
        config = ComoeConfig.preset("mixlora", r=4, lora_dropout=0.0)
        model = get_comoe_model(tiny_llama(), config).eval()
        for layer in model.comoe_layers().values():
            torch.nn.init.normal_(layer.lora_B, 0, 0.2)
        with torch.no_grad():
            auto = model(ids).logits
            assert len(calls) == 8 and calls[0] == 12  # 2 layers x q/k/v/o, 12 tokens each
            for layer in model.comoe_layers().values():
                layer.expert_compute = "blocks"
            torch.testing.assert_close(model(ids).logits, auto)
        assert len(calls) == 8
    finally:
        unregister_strategy("toy")
    assert choose_strategy("auto", 8, 2) == "blocks"
