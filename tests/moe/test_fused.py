"""RouteMixBlocks against route + the blocks strategy: gradcheck in float64, values and every gradient."""

import pytest
import torch
from torch import nn

from comoe.adapter import layer as layer_module
from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import ComoeConfig
from comoe.moe.experts import mix_blocks
from comoe.moe.fused import (
    LinearRouteMixBlocks,
    RouteMixBlocks,
    autocasting,
    fuses,
    gate_expansion,
    linear_mix_inference,
    linear_route_and_mix,
    route_and_mix,
)
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


def linear_inputs(dtype=torch.float64, seed=4, tokens=6, d_in=5, n=4, r=3, d_out=5):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    return tensor(tokens, d_in), tensor(n, d_in), tensor(n * r, d_in), tensor(n, r, d_out), tensor(tokens, d_in)


@pytest.mark.parametrize("kind, normalize", MODES)
@pytest.mark.parametrize("separate_input", [False, True])
def test_linear_fused_gradcheck_in_float64_through_every_output(kind, normalize, separate_input):
    soft = kind == "soft"
    x, router, down, lora_B, x_down = linear_inputs()

    def outputs(x, router, down, lora_B, x_down):
        result = LinearRouteMixBlocks.apply(
            x, router, down, lora_B, x_down if separate_input else None, 1.5, 2, soft, normalize
        )
        return tuple(t for t in result if t.is_floating_point())  # delta, logits, z, probs (and gates)

    assert torch.autograd.gradcheck(outputs, (x, router, down, lora_B, x_down))


@pytest.mark.parametrize("kind, normalize", MODES)
@pytest.mark.parametrize("separate_input", [False, True])
def test_linear_fused_equals_the_written_out_layer_in_values_and_every_gradient(kind, normalize, separate_input):
    """Router logits x W_g^T, z = x_down W_down^T, route, blocks: the outputs and the gradients of x, the
    router, A, B and the experts' own input, with a loss reading every output (the objectives read
    logits, z, probs and gates)."""
    soft = kind == "soft"
    x, router, down, lora_B, x_down = linear_inputs(dtype=torch.float32, seed=5, tokens=9, d_in=8, n=6, r=4)
    experts_input = x_down if separate_input else x
    inputs_ = (x, router, down, lora_B, x_down)

    def loss(delta, logits, z, routing):
        return (
            (delta**2).sum() + (logits**2).sum() + (z * z.detach()).sum() + routing.probs[:, 0].sum()
            + (routing.gates**2).sum()
        )  # fmt: skip

    logits = x @ router.t()
    routing = route(logits, 2, soft=soft, normalize=normalize)
    z = (experts_input @ down.t()).view(9, 6, 4)
    delta = mix_blocks(z, routing, lora_B, 1.5)
    expected = torch.autograd.grad(loss(delta, logits, z, routing), inputs_, allow_unused=True)
    fused = linear_route_and_mix(
        x, router, down, lora_B, x_down if separate_input else None, 1.5, 2, soft, normalize
    )
    for mine, theirs in zip(fused[:3], (delta, logits, z), strict=True):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(fused[3].gates, routing.gates)
    got = torch.autograd.grad(loss(*fused), inputs_, allow_unused=True)
    for mine, theirs in zip(got, expected, strict=True):  # float32 sums in another order: 1e-4
        if theirs is None:
            assert mine is None or not mine.any()
        else:
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset, fields", [("moe", dict(lora_dropout=0.1)), ("comoe", dict(router_jitter=0.05))])
def test_a_layer_with_dropout_or_jitter_matches_its_unfused_path(preset, fields):
    """The linear-fused layer (the lora bank has a down_weight) against the same layer forced onto the
    general path (the grouped strategy computes the same sum), with the same random draws."""
    config = ComoeConfig.preset(preset, r=4, expert_compute="blocks", **fields)
    torch.manual_seed(0)
    layer = ComoeLinear(nn.Linear(16, 12), config, ComoeContext())
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    layer.train()
    x = torch.randn(10, 16, requires_grad=True)
    parameters = [x, layer.router.weight, layer.lora_A, layer.lora_B]
    torch.manual_seed(1)
    out = layer(x)
    got = torch.autograd.grad((out**2).sum(), parameters)
    layer.expert_compute = "grouped"
    torch.manual_seed(1)
    expected_out = layer(x)
    expected = torch.autograd.grad((expected_out**2).sum(), parameters)
    torch.testing.assert_close(out, expected_out)
    for mine, theirs in zip(got, expected, strict=True):  # float32 sums in another order: 1e-4
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_autocasting_is_read_per_device_type_and_false_where_autocast_does_not_exist():
    assert not autocasting("cpu") and not autocasting("meta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocasting("cpu") and not autocasting("meta")


@pytest.mark.parametrize("kind, normalize", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_inference_mix_equals_the_fused_functions_delta(kind, normalize, dtype):
    x, router_weight, down_weight, lora_B, _ = linear_inputs(dtype=dtype, tokens=40)
    with torch.no_grad():
        expected = linear_route_and_mix(x, router_weight, down_weight, lora_B, None, 0.7, 2, kind == "soft", normalize)
        got = linear_mix_inference(x, router_weight, down_weight, lora_B, 0.7, 2, kind == "soft", normalize)
    torch.testing.assert_close(got, expected[0])


@pytest.mark.parametrize("preset, fast", [("comoe", 1), ("moe", 1), ("hydralora", 0), ("adamole", 0)])
def test_an_eval_forward_without_gradients_equals_the_one_with_them(preset, fast, monkeypatch):
    """A layer in eval mode under no_grad takes linear_mix_inference where its preset takes the linear
    fused Function (LoRA experts with one down-projection matrix, top-k or soft routing; not HydraLoRA's
    shared A nor AdaMoLE's threshold routing): the output is the fused path's (the same call with gradients enabled), and a kept
    record still comes from the fused path (its routing and z)."""
    calls = []

    def counted(*args):
        calls.append(1)
        return linear_mix_inference(*args)

    monkeypatch.setattr(layer_module, "linear_mix_inference", counted)
    config = ComoeConfig.preset(preset, r=4, lora_dropout=0.0, expert_compute="blocks")
    torch.manual_seed(0)
    context = ComoeContext()
    layer = ComoeLinear(nn.Linear(16, 12), config, context).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    x = torch.randn(2, 5, 16)
    with_gradients = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), with_gradients.detach())
        context.keep_records = True
        torch.testing.assert_close(layer(x), with_gradients.detach())
        assert layer.record is not None and layer.record.z.shape == (10, layer.num_experts, 4)
    assert len(calls) == fast
