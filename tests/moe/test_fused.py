"""RouteMixBlocks against route + the blocks strategy: gradcheck in float64, values and every gradient."""

import pytest
import torch
from torch import nn

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import ComoeConfig
from comoe.moe.experts import mix_blocks
from comoe.moe.fused import RouteMixBlocks, fuses, gate_expansion, route_and_mix
from comoe.moe.routing import SoftRouting, TopKRouting, route

MODES = [("topk", True), ("topk", False), ("soft", True)]


def inputs(tokens=6, n=4, r=3, d_out=5, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, n, generator=generator, dtype=dtype).requires_grad_()
    z = torch.randn(tokens, n, r, generator=generator, dtype=dtype).requires_grad_()
    lora_B = torch.randn(n, r, d_out, generator=generator, dtype=dtype).requires_grad_()
    return logits, z, lora_B


@pytest.mark.parametrize("kind, normalize", MODES)
def test_gradcheck_in_float64_through_every_output(kind, normalize):
    soft = kind == "soft"
    logits, z, lora_B = inputs()

    def outputs(logits, z, lora_B):
        result = RouteMixBlocks.apply(logits, z, lora_B, 1.5, 2, soft, normalize)
        return tuple(t for t in result if t.is_floating_point())  # delta, probs (and gates)

    assert torch.autograd.gradcheck(outputs, (logits, z, lora_B))


@pytest.mark.parametrize("kind, normalize", MODES)
@pytest.mark.parametrize("reads", ["delta", "probs", "gates", "all"])
def test_equals_route_then_blocks_in_values_and_every_gradient(kind, normalize, reads):
    """The routing's probabilities and gates carry gradients as the objectives read them (balance reads
    probs; an objective may read the gates), alone and together with the output's."""
    soft = kind == "soft"
    logits, z, lora_B = inputs(tokens=9, n=6, r=4, d_out=7, dtype=torch.float32, seed=1)
    weights = torch.randn(9, 7), torch.randn(9, 6), torch.randn(9, 6 if soft else 2)

    def loss(delta, routing):
        parts = {
            "delta": (delta * weights[0]).sum(),
            "probs": (routing.probs * weights[1]).sum(),
            "gates": (routing.gates * weights[2]).sum(),
        }
        return sum(parts.values()) if reads == "all" else parts[reads]

    routing = route(logits, 2, soft=soft, normalize=normalize)
    expected_delta = mix_blocks(z, routing, lora_B, 1.5)
    expected = torch.autograd.grad(loss(expected_delta, routing), (logits, z, lora_B), allow_unused=True)
    delta, fused_routing = route_and_mix(logits, z, lora_B, 1.5, 2, soft=soft, normalize=normalize)
    torch.testing.assert_close(delta, expected_delta)
    for field in ("probs", "indices", "gates"):
        torch.testing.assert_close(getattr(fused_routing, field), getattr(routing, field))
    got = torch.autograd.grad(loss(delta, fused_routing), (logits, z, lora_B), allow_unused=True)
    for mine, theirs in zip(got, expected, strict=True):
        if theirs is None:
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, theirs)


def test_bfloat16_experts_with_float32_routing_match_blocks():
    logits, z, lora_B = inputs(dtype=torch.float32, seed=2)
    z16, b16 = z.detach().bfloat16().requires_grad_(), lora_B.detach().bfloat16().requires_grad_()
    routing = route(logits, 2)
    expected = mix_blocks(z16, routing, b16, 2.0)
    delta, _ = route_and_mix(logits, z16, b16, 2.0, 2)
    assert delta.dtype == torch.bfloat16
    torch.testing.assert_close(delta, expected, atol=2e-2, rtol=2e-2)
    delta.float().sum().backward()
    assert z16.grad.dtype == torch.bfloat16 and b16.grad.dtype == torch.bfloat16


def test_expanded_z_of_a_shared_down_projection_gets_its_summed_gradient():
    """HydraLoRA's z is one A x expanded over the heads (a stride-0 view): its gradient sums the heads'."""
    logits, _, lora_B = inputs(dtype=torch.float32, seed=3)
    shared = torch.randn(6, 3, requires_grad=True)
    delta, _ = route_and_mix(logits, shared.unsqueeze(1).expand(-1, 4, -1), lora_B, 1.0, 4, soft=True)
    (delta**2).sum().backward()
    reference = shared.detach().clone().requires_grad_()
    routing = route(logits, 4, soft=True)
    (mix_blocks(reference.unsqueeze(1).expand(-1, 4, -1), routing, lora_B, 1.0) ** 2).sum().backward()
    torch.testing.assert_close(shared.grad, reference.grad)


def test_gate_expansion_spreads_each_gate_over_its_rank_with_the_scaling():
    expansion = gate_expansion(3, 2, 0.5, torch.device("cpu"))
    gates = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(gates @ expansion, torch.tensor([[0.5, 0.5, 1.0, 1.0, 1.5, 1.5]]))
    assert gate_expansion(3, 2, 0.5, torch.device("cpu")) is expansion  # built once


def test_fuses_only_the_builtin_kinds_with_the_blocks_strategy():
    class Subclass(TopKRouting):
        name = "toy"

    assert fuses(TopKRouting, "blocks") and fuses(SoftRouting, "blocks")
    assert not fuses(TopKRouting, "grouped") and not fuses(Subclass, "blocks")


@pytest.mark.parametrize("preset", ["comoe", "hydralora", "mixlora"])
def test_a_layer_on_the_blocks_strategy_equals_the_unfused_composition(preset):
    """ComoeLinear takes route_and_mix with the blocks strategy: its output and the gradients of router,
    A, B and the input equal route + mix_blocks written out over the same parameters."""
    config = ComoeConfig.preset(preset, r=4, lora_dropout=0.0, expert_compute="blocks")
    torch.manual_seed(0)
    layer = ComoeLinear(nn.Linear(16, 12), config, ComoeContext())
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    parameters = [x, layer.router.weight, layer.lora_A, layer.lora_B]
    out = layer(x)
    got = torch.autograd.grad((out**2).sum(), parameters)
    flat = x.reshape(-1, 16)
    routing = route(layer.router(flat), layer.top_k, soft=config.routing == "soft")
    z = layer.bank.down_project(layer, flat)
    expected_out = layer.base_layer(x) + mix_blocks(z, routing, layer.lora_B, layer.scaling).view(2, 5, 12)
    torch.testing.assert_close(out, expected_out)
    expected = torch.autograd.grad((expected_out**2).sum(), parameters)
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, theirs)
