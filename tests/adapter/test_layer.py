"""The fast expert paths (blocks, grouped) against a plain dense reference: outputs and all gradients."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from comoe import get_comoe_model
from comoe.adapter.layer import ComoeContext, ComoeLinear, base_weight
from comoe.analysis.metrics import SpecialisationAccumulator, routing_stats
from comoe.config import ComoeConfig
from comoe.objectives.balance import balance_loss
from tests.helpers import dense_reference, grads, make_layer, tiny_llama

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


@pytest.mark.parametrize("strategy", ["blocks", "grouped"])
def test_float32_experts_under_bfloat16_autocast_match_the_float32_layer(strategy):
    """Mixed precision (torch.autocast, as Trainer's bf16=True runs it): the down-projection comes out in
    bfloat16 while the experts' B stays float32, and every strategy must take that mix of dtypes."""
    layer = make_layer(32, 24, 8, 2, 8, strategy)
    x = torch.randn(4, 6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    ref = dense_reference(layer, x)
    assert (out.double() - ref).abs().max() / ref.abs().max() < 2e-2
    for fast, slow in zip(grads(layer, x, out.float()), grads(layer, x, ref), strict=True):
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


ROUTING_MODES = {
    "top1": dict(top_k=1),
    "top2": dict(top_k=2),
    "top2-unnormalised": dict(top_k=2, norm_topk_prob=False),
    "soft": dict(routing="soft"),
}


@pytest.mark.parametrize("mode", sorted(ROUTING_MODES))
def test_every_routing_mode_gives_the_router_a_task_gradient(mode):
    """Top-1 used to renormalise its gate to p / p = 1: the router learned nothing from the task."""
    config = ComoeConfig(
        num_experts=4, contrastive="none", balance_weight=0, lora_dropout=0.0, **ROUTING_MODES[mode]
    )
    model = get_comoe_model(tiny_llama(), config)
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.2)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    norm = sum(float(layer.router.weight.grad.norm()) for layer in model.comoe_layers().values())
    assert norm > 1e-3
    if mode == "top1":  # asking for renormalised top-1 gates gives them back, without a router gradient
        forced = get_comoe_model(tiny_llama(), ComoeConfig(**{**config.to_dict(), "norm_topk_prob": True}))
        with torch.no_grad():
            for a, b in zip(forced.comoe_layers().values(), model.comoe_layers().values(), strict=True):
                a.lora_B.copy_(b.lora_B)
        forced(input_ids=ids, labels=ids).loss.backward()
        assert sum(float(layer.router.weight.grad.norm()) for layer in forced.comoe_layers().values()) < 1e-6


@pytest.mark.parametrize("mode", ["top1", "top2", "soft"])
def test_a_collapsed_router_is_flagged_and_its_balance_loss_pushes_back(mode):
    """A router putting 99.8% of its mass on expert 0: reported collapsed (routing statistics and the
    analysis summary), and a balance loss above its uniform value 1 with a gradient; a uniform router is
    neither."""
    config = ComoeConfig(num_experts=4, balance_weight=0.01, lora_dropout=0.0, **ROUTING_MODES[mode])
    x = torch.randn(40, 16)
    x[:, 0] = 1.0
    results = {}
    for name, logit in (("collapsed", math.log(0.998 * 3 / 0.002)), ("uniform", 0.0)):
        context = ComoeContext()
        context.keep_records = True
        layer = ComoeLinear(nn.Linear(16, 8), config, context)
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[0, 0] = logit
        layer(x)
        record = layer.record
        loss = balance_loss(record, config)
        (gradient,) = torch.autograd.grad(loss, layer.router.weight)
        summary = SpecialisationAccumulator({"q": layer}, ["task"], similarity=False)
        summary.update({"q": record}, torch.zeros(40, dtype=torch.long))
        flagged = summary.summary()["layers"]["q"]["collapsed"]
        stats = routing_stats(record.routing.indices, record.routing.probs)
        results[name] = (float(loss), float(gradient.norm()), flagged, stats["collapsed"], stats["mass"][0])
    loss, gradient, flagged, stats_flag, mass = results["collapsed"]
    assert mass == pytest.approx(0.998, abs=1e-4)
    assert flagged and stats_flag
    assert loss > 1.5 and gradient > 1e-3
    uniform_loss, _, uniform_flag, uniform_stats_flag, _ = results["uniform"]
    assert uniform_loss == pytest.approx(1.0, abs=1e-6)
    # (a uniform top-k router ties, and its argmax sends every token to the same experts: that is collapse)
    assert mode != "soft" or not (uniform_flag or uniform_stats_flag)


# ---- router jitter (Switch Transformer): the router's input times U(1 - eps, 1 + eps), in training only -----
def jitter_layer(jitter: float, dropout: float = 0.0) -> ComoeLinear:
    torch.manual_seed(0)
    config = ComoeConfig(num_experts=4, top_k=2, r=4, lora_dropout=dropout, router_jitter=jitter)
    context = ComoeContext()
    context.keep_records = True
    layer = ComoeLinear(nn.Linear(16, 12), config, context)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        layer.router.weight.normal_(0, 1.0)
    return layer


def test_router_jitter_leaves_evaluation_unchanged_and_zero_is_the_plain_path():
    x = torch.randn(32, 16)
    plain, jittered = jitter_layer(0.0), jitter_layer(0.3)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), jittered.eval()(x))  # evaluation: no jitter
        plain.train()
        state = torch.get_rng_state()
        out = plain(x)
        assert torch.equal(torch.get_rng_state(), state)  # 0: nothing drawn, today's path bit for bit
        assert torch.equal(out, plain.eval()(x))  # (no dropout: training and evaluation agree)
    assert ComoeConfig().router_jitter == 0.0 and "router_jitter" not in ComoeConfig().to_dict()
    with pytest.raises(ValueError, match=r"router_jitter=1.0 is invalid: expected a finite number >= 0.0 and < 1"):
        ComoeConfig(router_jitter=1.0)


def test_router_jitter_in_training_varies_the_routing_with_the_seed_and_only_the_router_sees_it():
    x = torch.randn(64, 16)
    layer = jitter_layer(0.3).train()

    def routed(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = layer(x)
        return out, layer.record.routing.probs, layer.record.z

    out0, probs0, z0 = routed(0)
    out0b, probs0b, _ = routed(0)
    out1, probs1, z1 = routed(1)
    assert torch.equal(probs0, probs0b) and torch.equal(out0, out0b)  # seeded: reproducible
    assert not torch.allclose(probs0, probs1) and not torch.allclose(out0, out1)  # another seed: other gates
    assert torch.equal(z0, z1)  # the experts' input is not jittered
    with torch.no_grad():
        clean = torch.softmax(layer.router(x).float(), dim=-1)
    ratio = (probs0 / clean).log().abs().max()
    assert 0 < ratio < 5  # near the unjittered probabilities, not equal to them


def test_base_weight_is_w0_as_d_out_by_d_in_and_a_quantized_weight_is_refused():
    linear = nn.Linear(12, 10)
    assert base_weight(linear) is linear.weight
    conv = Conv1D(10, 12)  # GPT-2's layout: weight [d_in, d_out], y = x W + b
    assert base_weight(conv).shape == (10, 12) and torch.equal(base_weight(conv), conv.weight.t())
    x = torch.randn(3, 12)
    torch.testing.assert_close(x @ base_weight(conv).t() + conv.bias, conv(x))
    stored = nn.Linear(12, 10)
    stored.weight = nn.Parameter(torch.zeros(10, 12, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="the base layer Linear holds its weight as Parameter of dtype torch.int8"):
        base_weight(stored)
    layer = ComoeLinear(nn.Linear(12, 10), ComoeConfig(r=2, expert_bank="dora"), ComoeContext())
    layer.base_layer.weight = stored.weight
    with pytest.raises(ValueError, match="^expert_bank='dora': the base layer Linear holds"):
        layer.base_weight()
