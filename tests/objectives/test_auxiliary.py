"""The objective registry: the names ComoeConfig accepts are exactly the registered objectives, and the
auxiliary losses of a forward are the per-layer objectives averaged over layers."""

import dataclasses

import pytest
import torch
from torch import nn

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import CONTRASTIVES, ComoeConfig
from comoe.moe.experts import expert_gram
from comoe.objectives.auxiliary import (
    active_objectives,
    auxiliary_losses,
    contrastive_loss,
    objective_mean,
    record_group,
    with_grams,
)
from comoe.objectives.contrastive import stacked_grams
from comoe.objectives.reference import load_balance_loss
from comoe.objectives.registry import OBJECTIVES, Objective


def test_config_contrastive_choices_are_registered_contrastive_objectives():
    assert {OBJECTIVES[name].component for name in CONTRASTIVES if name != "none"} == {"contrastive"}
    assert OBJECTIVES["balance"].component == "balance"


def records(config, layers=3, tokens=12):
    context = ComoeContext()
    context.keep_records = True
    result = []
    for seed in range(layers):
        torch.manual_seed(seed)
        layer = ComoeLinear(nn.Linear(16, 16), config, context)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.3)
        layer(torch.randn(tokens, 16))
        result.append(layer.record)
    return result


@pytest.mark.parametrize("preset", ["comoe", "moelora", "mixlora", "moe"])
def test_auxiliary_losses_are_layer_means_of_each_objective(preset):
    config = ComoeConfig.preset(preset, r=4, lora_dropout=0.0)
    kept = records(config)
    losses = auxiliary_losses(kept, config)
    if config.contrastive == "none":
        assert float(losses["contrastive"]) == 0.0
    else:
        expected = torch.stack([contrastive_loss(r, config) for r in kept]).mean()
        torch.testing.assert_close(losses["contrastive"], expected)
        assert float(losses["contrastive"].detach()) != 0.0
    if config.balance_weight == 0:
        assert float(losses["balance"]) == 0.0
    else:
        expected = torch.stack([load_balance_loss(r.routing.probs, r.routing.indices) for r in kept]).mean()
        torch.testing.assert_close(losses["balance"], expected)


@pytest.mark.parametrize("preset", ["comoe", "moe", "mixlora", "moelora"])
def test_layer_and_objectives_never_read_device_values_on_the_host(preset):
    """On meta tensors (shapes, no values) any host read of a value (bool(), .item(), nonzero, boolean
    indexing) raises: forward, auxiliary losses and backward running there means none happens, so on a
    GPU nothing stalls the queue (measured: such reads made the comoe step 3x slower than moe's on an H100).
    The moelora objective samples a fixed number of tokens (sample_contrastive_tokens) for the same reason."""
    config = ComoeConfig.preset(preset, r=4, lora_dropout=0.0, expert_compute="blocks")
    context = ComoeContext()
    context.keep_records = True
    layer = ComoeLinear(nn.Linear(16, 16), config, context).to("meta")
    out = layer(torch.randn(12, 16, device="meta"))
    record = dataclasses.replace(layer.record, mask=torch.ones(12, dtype=torch.bool, device="meta"))
    losses = auxiliary_losses([record], config)
    (out.sum() + losses["balance"] + losses["contrastive"]).backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.device.type == "meta"


def mixed_records(config, tokens=12, seed=0):
    """Records of one forward over layers of different shapes, with padded tokens: q/o (16 -> 16) and
    k/v (16 -> 8, a grouped-query model's smaller projections), and a MoLA-style layer with more experts
    (its own config), so one call groups them three ways. Returns (layers, records)."""
    generator = torch.Generator().manual_seed(seed)
    context = ComoeContext()
    context.keep_records = True
    more = dataclasses.replace(config, num_experts=config.num_experts + 2)
    shapes = [(16, config), (8, config), (16, config), (8, config), (16, more), (16, more)]
    layers, result = [], []
    for index, (out_features, layer_config) in enumerate(shapes):
        torch.manual_seed(seed * 100 + index)
        layer = ComoeLinear(nn.Linear(16, out_features), layer_config, context)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.3)
        layer(torch.randn(tokens, 16, generator=generator))
        mask = torch.rand(tokens, generator=generator) > 0.3
        mask[0] = True
        layers.append(layer)
        result.append(dataclasses.replace(layer.record, mask=mask))
    return layers, result


BATCHED_CASES = [
    ("comoe", dict()),
    ("comoe", dict(anchor="random")),
    ("comoe", dict(num_negatives=1)),
    ("comoe", dict(contrastive_norm_floor=0.0)),
    ("moelora", dict()),
    ("moelora", dict(contrastive_max_tokens=5)),
    ("mixlora", dict()),
    ("mixlora", dict(aux_objectives={"router_z": 0.001})),
    ("hydralora", dict(balance_weight=0.01)),  # dense routing: the load is the probability mass
    ("comoe-dora", dict()),  # materialised outputs (DoRA experts): their plain cosines, batched too
    ("comoe-dora", dict(contrastive="moelora")),  # materialised outputs: declined, per layer
]


@pytest.mark.parametrize("preset, fields", BATCHED_CASES, ids=lambda value: str(value))
def test_batched_objectives_equal_the_per_layer_loss_in_value_and_every_gradient(preset, fields):
    """Each built-in objective computed once per group of same-shape layers equals its per-layer `loss`
    averaged over layers: values and the gradients of every router, A and B, with padded tokens, two
    output widths and two expert counts in one forward (three groups). Random draws are taken per group
    in one call, which on the CPU generator gives the per-layer calls' numbers in group order."""
    config = ComoeConfig.preset(preset, r=4, lora_dropout=0.0, **fields)
    layers, kept = mixed_records(config)
    assert len({record_group(record) for record in kept}) == 3
    parameters = [p for layer in layers for p in layer.parameters()]
    checked = 0
    for objective, _ in active_objectives(config).values():
        assert objective.batched_loss is not None
        torch.manual_seed(7)
        batched = objective_mean(objective, kept, config)
        torch.manual_seed(7)  # the same draws (random anchors, negatives, token samples) in group order
        keys = [record_group(record) for record in kept]
        in_groups = [kept[i] for i in sorted(range(len(kept)), key=lambda i: keys.index(keys[i]))]
        per_layer = torch.stack([objective.loss(record, config) for record in in_groups]).mean()
        torch.testing.assert_close(batched, per_layer)
        assert float(per_layer.detach()) != 0.0
        grads = torch.autograd.grad(batched, parameters, retain_graph=True, allow_unused=True)
        expected = torch.autograd.grad(per_layer, parameters, retain_graph=True, allow_unused=True)
        for got, want in zip(grads, expected, strict=True):
            if want is None:
                assert got is None or not got.any()
            else:
                torch.testing.assert_close(got, want)
        checked += 1
    assert checked == len(active_objectives(config)) >= 1


def test_an_objective_without_a_batched_form_runs_per_layer_and_one_may_decline_a_group():
    calls = []

    def per_layer(record, config):
        calls.append("layer")
        return record.routing.probs.sum()

    def decline(records, config):
        calls.append("group")
        return None

    config = ComoeConfig.preset("moe", r=4, lora_dropout=0.0)
    _, kept = mixed_records(config)
    expected = torch.stack([r.routing.probs.sum() for r in kept]).mean()
    plain = Objective("toy", per_layer, component="toy")
    torch.testing.assert_close(objective_mean(plain, kept, config), expected)
    assert calls == ["layer"] * 6
    calls.clear()
    declining = dataclasses.replace(plain, batched_loss=decline)
    torch.testing.assert_close(objective_mean(declining, kept, config), expected)
    assert calls == ["group", "layer", "layer", "group", "layer", "layer", "group", "layer", "layer"]


@pytest.mark.parametrize("preset", ["comoe", "moelora"])
def test_grams_kept_by_the_forward_and_grams_of_the_stacked_b_give_the_same_objective(preset):
    """In one process the layers keep no Gram matrix and the objective takes the group's Grams in one
    batched matmul; with several processes (FSDP reshards B after the forward) the forward keeps each
    layer's: the same values and gradients."""
    config = ComoeConfig.preset(preset, r=4, lora_dropout=0.0)
    layers, kept = mixed_records(config)
    assert all(record.gram is None for record in kept)  # one process
    with_grams = [dataclasses.replace(record, gram=expert_gram(record.lora_B)) for record in kept]
    parameters = [p for layer in layers for p in layer.parameters()]
    objective = active_objectives(config)[preset][0]
    torch.manual_seed(7)
    deferred = objective_mean(objective, kept, config)
    torch.manual_seed(7)
    forward = objective_mean(objective, with_grams, config)
    torch.testing.assert_close(deferred, forward)
    got = torch.autograd.grad(deferred, parameters, retain_graph=True, allow_unused=True)
    expected = torch.autograd.grad(forward, parameters, retain_graph=True, allow_unused=True)
    for mine, theirs in zip(got, expected, strict=True):
        assert (mine is None) == (theirs is None)
        if theirs is not None:
            torch.testing.assert_close(mine, theirs)


def test_grams_taken_for_a_group_are_not_stacked_again_and_give_the_layers_gradients():
    config = ComoeConfig.preset("comoe", r=4, lora_dropout=0.0)
    layers, kept = mixed_records(config)
    filled = with_grams(kept)
    first_group = [record for record in filled if record_group(record) == record_group(filled[0])]
    base = stacked_grams(first_group)
    assert base is first_group[0].gram._base  # the batched matmul's own output
    assert not torch.equal(stacked_grams(first_group[::-1]), base)  # another order: stacked anew
    torch.testing.assert_close(stacked_grams(first_group[::-1]), base.flip(0))
    parameters = [p for layer in layers for p in layer.parameters()]
    value = auxiliary_losses(kept, config)["contrastive"]
    grads = torch.autograd.grad(value, parameters, allow_unused=True, retain_graph=True)
    torch.manual_seed(0)
    expected = torch.autograd.grad(
        torch.stack([contrastive_loss(record, config) for record in kept]).mean(), parameters, allow_unused=True
    )
    for got, want in zip(grads, expected, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want)
