"""AdaMoLE's threshold routing: its gates against a per-token loop over the paper's rule, the layer against
the release's per-expert loop (values and gradients), a variable number of active experts that is never
zero, the adamole preset built, counted, saved with its threshold network and loaded."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.moe.routing import get_routing
from comoe.moe.threshold import ThresholdRouting, threshold_route
from tests.helpers import tiny_llama


def reference_gates(logits, threshold_logits):
    """AdaMoLE's rule token by token: p = softmax, tau = sigmoid / n, weights p_i - tau over {p_i >= tau},
    renormalised; [T, n] dense gates and the active sets."""
    n = logits.shape[1]
    gates, active = [], []
    for row, threshold in zip(logits, threshold_logits, strict=True):
        p = torch.softmax(row.double(), dim=0)
        tau = torch.sigmoid(threshold.double()[0]) / n
        chosen = [i for i in range(n) if p[i] >= tau]
        total = sum(p[i] - tau for i in chosen)
        gates.append(torch.stack([(p[i] - tau) / total if i in chosen else p[i] * 0 for i in range(n)]))
        active.append([i in chosen for i in range(n)])
    return torch.stack(gates), torch.tensor(active)


def test_threshold_gates_against_the_per_token_rule_in_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(23, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    thresholds = (3 * torch.randn(23, 1, generator=g, dtype=torch.float64)).requires_grad_(True)
    routing = threshold_route(logits, thresholds)
    expected, active = reference_gates(logits, thresholds)
    assert torch.equal(routing.active, active)
    torch.testing.assert_close(routing.gates.double(), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(routing.indices, torch.arange(6).expand(23, 6))
    weights = torch.randn(23, 6, generator=g, dtype=torch.float64)
    fast = torch.autograd.grad((routing.gates.double() * weights).sum(), (logits, thresholds))
    slow = torch.autograd.grad((expected * weights).sum(), (logits, thresholds))
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(x.abs().sum() > 0 for x in fast)  # both the router and the threshold network learn


def test_the_number_of_active_experts_varies_and_the_top_expert_always_passes():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(400, 8, generator=g)
    routing = threshold_route(logits, 4 * torch.randn(400, 1, generator=g))
    counts = routing.active.sum(-1)
    assert counts.min() >= 1 and len(set(counts.tolist())) > 3  # variable k, never empty
    top = routing.probs.argmax(-1)
    assert routing.active[torch.arange(400), top].all() and (routing.gates[torch.arange(400), top] > 0).all()
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(400))
    assert torch.equal(routing.gates > 0, routing.active & (routing.gates > 0))  # inactive experts: gate 0


def test_a_saturated_threshold_at_uniform_probabilities_gives_zero_gates_not_nan():
    routing = threshold_route(torch.zeros(2, 4), torch.full((2, 1), 100.0))  # tau rounds to 1/4 = p_i
    assert routing.active.all() and torch.equal(routing.gates, torch.zeros(2, 4))


def adamole_layer(seed=0, n=5):
    torch.manual_seed(seed)
    config = ComoeConfig(num_experts=n, r=3, lora_alpha=6.0, lora_dropout=0.0, routing="threshold")
    layer = ComoeLinear(nn.Linear(10, 7), config, ComoeContext())
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)
        layer.threshold.bias.fill_(0.5)
    return layer


def release_forward(layer, x):
    """The release's AdaMoeLayer.forward as a loop over experts, each on the tokens that activate it."""
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    tau = torch.sigmoid(x @ layer.threshold.weight.t() + layer.threshold.bias) / layer.num_experts
    adapted = probs - tau
    selected = (adapted >= 0).float()
    weights = adapted * selected
    sums = weights.sum(-1, keepdim=True)
    weights = weights / torch.where(sums == 0, torch.ones_like(sums), sums)
    result = layer.base_layer(x)
    delta = torch.zeros_like(result)
    for i in range(layer.num_experts):
        rows = torch.where(selected[:, i] > 0)[0]
        expert = layer.scaling * (x[rows] @ layer.lora_A[i].t()) @ layer.lora_B[i]
        delta = delta.index_add(0, rows, weights[rows, i, None] * expert)
    return result + delta


@pytest.mark.parametrize("strategy", ["auto", "blocks", "grouped"])
def test_the_layer_equals_the_release_loop_in_values_and_gradients(strategy):
    layer = adamole_layer()
    layer.expert_compute = strategy
    assert layer.routing_kind is ThresholdRouting and layer.active_experts == 5
    x = torch.randn(31, 10, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(31, 7, generator=torch.Generator().manual_seed(3))
    params = [layer.router.weight, layer.threshold.weight, layer.threshold.bias, layer.lora_A, layer.lora_B]
    fast = layer(x)
    fast_grads = torch.autograd.grad((fast * weights).sum(), params)
    slow = release_forward(layer, x)
    slow_grads = torch.autograd.grad((slow * weights).sum(), params)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert a.abs().sum() > 0


def test_the_adamole_preset_is_the_releases_setup_and_saves_its_threshold_network(tmp_path):
    config = ComoeConfig.preset("adamole", lora_dropout=0.0)
    assert (config.num_experts, config.r, config.lora_alpha, config.routing) == (8, 4, 16.0, "threshold")
    assert (config.balance_weight, config.contrastive, config.active_experts) == (0.001, "none", 8)
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert get_routing("threshold") is ThresholdRouting
    torch.manual_seed(0)
    model = get_comoe_model(tiny_llama(), config)
    layers = model.comoe_layers()
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
            layer.threshold.bias.normal_()
    # per layer: n r (d_in + d_out) experts, n d_in router, d_in + 1 threshold network
    expected = sum(
        8 * 4 * (lay.in_features + lay.out_features) + 9 * lay.in_features + 1 for lay in layers.values()
    )
    assert model.get_nb_trainable_parameters()[0] == expected
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["model.layers.0.self_attn.q_proj.threshold.weight"].shape == (1, 64)
    assert saved["model.layers.1.self_attn.v_proj.threshold.bias"].shape == (1,)
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.comoe_config == model.comoe_config
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits)
