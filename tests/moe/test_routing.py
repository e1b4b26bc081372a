"""comoe.moe.routing: top-k gates renormalised, soft routing as the softmax, dense gates and the
expert-sorted layout against plain loops."""

import pytest
import torch
from safetensors.torch import load_file

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.moe.routing import (
    Router,
    Routing,
    RoutingKind,
    TopKRouting,
    get_routing,
    register_routing,
    route,
    sort_by_expert,
    unregister_routing,
)
from tests.helpers import tiny_llama


def logits(tokens=13, experts=6, seed=0, dtype=torch.float32):
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_top_k_routing_keeps_the_k_most_probable_experts_with_renormalised_gates(k):
    x = logits()
    routing = route(x, top_k=k)
    probs = torch.softmax(x.double(), -1)
    assert torch.allclose(routing.probs.double(), probs, atol=1e-6)
    assert routing.indices.shape == (13, k) and routing.indices.dtype == torch.int64
    for t in range(13):
        ranked = sorted(range(6), key=lambda i: -float(probs[t, i]))[:k]
        assert sorted(routing.indices[t].tolist()) == sorted(ranked)
        chosen = probs[t, routing.indices[t]]
        assert torch.allclose(routing.gates[t].double(), chosen / chosen.sum(), atol=1e-6)
    assert torch.allclose(routing.gates.sum(-1), torch.ones(13))
    assert routing.num_experts == 6


def test_top_1_gate_is_one_when_renormalised_and_the_probability_otherwise():
    x = logits().requires_grad_(True)
    routing = route(x, top_k=1)
    assert torch.equal(routing.gates.detach(), torch.ones(13, 1))
    switch = route(x, top_k=1, normalize=False)  # the Switch Transformer's gate
    torch.testing.assert_close(switch.gates, switch.probs.gather(1, switch.indices))
    assert torch.equal(switch.indices, routing.indices)
    (routing.probs[:, 0].sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_soft_routing_is_the_softmax_over_every_expert():
    x = logits(seed=1)
    routing = route(x, top_k=2, soft=True)  # top_k is ignored
    assert torch.equal(routing.indices, torch.arange(6).expand(13, 6))
    assert torch.allclose(routing.gates, torch.softmax(x, -1)) and routing.gates is routing.probs
    assert torch.allclose(routing.dense_gates(), torch.softmax(x, -1))


def test_half_precision_logits_give_float32_probabilities():
    routing = route(logits(dtype=torch.bfloat16), top_k=2)
    assert routing.probs.dtype == torch.float32 and routing.gates.dtype == torch.float32
    assert torch.allclose(routing.probs, torch.softmax(logits(dtype=torch.bfloat16).float(), -1))


def test_dense_gates_scatter_each_active_gate_into_its_expert_column():
    routing = route(logits(seed=2), top_k=3)
    dense = routing.dense_gates()
    expected = torch.zeros(13, 6)
    for t in range(13):
        for slot in range(3):
            expected[t, routing.indices[t, slot]] = routing.gates[t, slot]
    assert torch.equal(dense, expected)
    assert torch.equal((dense > 0).sum(-1), torch.full((13,), 3))


def test_dense_gates_of_a_hand_made_routing():
    routing = Routing(
        probs=torch.zeros(2, 4),
        indices=torch.tensor([[3, 1], [0, 2]]),
        gates=torch.tensor([[0.7, 0.3], [0.6, 0.4]]),
    )
    assert torch.equal(routing.dense_gates(), torch.tensor([[0.0, 0.3, 0.0, 0.7], [0.6, 0.0, 0.4, 0.0]]))


@pytest.mark.parametrize(("tokens", "k", "n"), [(17, 2, 5), (1, 1, 3), (9, 3, 8), (0, 2, 4)])
def test_sort_by_expert_against_a_python_loop(tokens, k, n):
    g = torch.Generator().manual_seed(tokens + k)
    indices = (
        torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(tokens)])
        if tokens
        else torch.zeros(0, k, dtype=torch.long)
    )
    pairs = sort_by_expert(indices, n)
    # the (token, slot) pairs of each expert, in token order (a stable sort)
    expected = [
        (t, s, int(indices[t, s]))
        for e in range(n)
        for t in range(tokens)
        for s in range(k)
        if indices[t, s] == e
    ]
    assert pairs.order.tolist() == [t * k + s for t, s, _ in expected]
    assert pairs.tokens.tolist() == [t for t, _, _ in expected]
    assert pairs.experts.tolist() == [e for _, _, e in expected]
    counts = [sum(1 for _, _, e in expected if e == i) for i in range(n)]
    assert pairs.counts.tolist() == counts
    assert pairs.offsets.dtype == torch.int32
    assert pairs.offsets.tolist() == [sum(counts[: i + 1]) for i in range(n)]


def test_sort_by_expert_counts_unused_experts_as_empty_groups():
    pairs = sort_by_expert(torch.tensor([[4, 1], [1, 4], [4, 1]]), 6)
    assert pairs.counts.tolist() == [0, 3, 0, 0, 3, 0]
    assert pairs.offsets.tolist() == [0, 3, 3, 3, 6, 6]
    assert pairs.tokens.tolist() == [0, 1, 2, 0, 1, 2]


def test_router_is_a_bias_free_linear_of_the_input_features():
    torch.manual_seed(0)
    router = Router(in_features=10, num_experts=4)
    assert router.weight.shape == (4, 10) and router.bias is None
    x = torch.randn(3, 10)
    assert torch.allclose(router(x), x @ router.weight.t())


class FixedFirstExpert(RoutingKind):
    """A toy kind registered from this test alone: every token to expert 0 with gate 1, plus a learned
    per-expert bias on the logits (a router parameter beyond router.weight, saved under its own key)."""

    name = "first_toy"

    @classmethod
    def shapes(cls, num_experts, in_features):
        return {**super().shapes(num_experts, in_features), "router_bias": (num_experts,)}

    @classmethod
    def create(cls, layer, factory):
        super().create(layer, factory)
        layer.router_bias = torch.nn.Parameter(torch.zeros(layer.num_experts, **factory))

    @classmethod
    def route(cls, layer, x):
        logits = layer.router(x) + layer.router_bias
        probs = torch.softmax(logits.float(), -1)
        indices = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        return logits, Routing(probs, indices, torch.ones(x.shape[0], 1, device=x.device))


@pytest.fixture
def first_toy():
    register_routing(FixedFirstExpert)
    yield FixedFirstExpert
    unregister_routing(FixedFirstExpert.name)


def test_a_routing_kind_registered_from_outside_routes_saves_and_loads(first_toy, tmp_path):
    torch.manual_seed(0)
    config = ComoeConfig.preset("moe", routing="first_toy", top_k=1, lora_dropout=0.0)
    model = get_comoe_model(tiny_llama(), config)
    layers = model.comoe_layers()
    for layer in layers.values():
        assert layer.routing_kind is first_toy and layer.active_experts == 1
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
            layer.router_bias.normal_()
    ids = torch.randint(0, 100, (2, 7))
    with model.record_routing() as records:
        trained = model(ids).logits
    assert all(torch.equal(r.routing.indices, torch.zeros_like(r.routing.indices)) for r in records.values())
    # expert 0 alone: the layer is W0 x + s B_0 A_0 x
    layer = next(iter(layers.values()))
    x = torch.randn(5, layer.in_features)
    expected = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A[0].t()) @ layer.lora_B[0]
    torch.testing.assert_close(layer(x), expected)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {k for k in keys if k.endswith("router_bias")} and {k for k in keys if k.endswith("router.weight")}
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained)


def test_unknown_routing_kinds_are_refused_listing_the_registered_ones():
    assert get_routing("topk") is TopKRouting and get_routing("soft").dense
    with pytest.raises(ValueError, match="routing='dense' is not a registered routing kind; valid: topk, soft"):
        get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", routing="dense"))
