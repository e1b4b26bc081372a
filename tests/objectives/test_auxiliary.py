"""The objective registry: the names ComoeConfig accepts are exactly the registered objectives, and the
auxiliary losses of a forward are the per-layer objectives averaged over layers."""

import dataclasses

import pytest
import torch
from torch import nn

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import CONTRASTIVES, ComoeConfig
from comoe.objectives.auxiliary import auxiliary_losses, contrastive_loss
from comoe.objectives.reference import load_balance_loss
from comoe.objectives.registry import OBJECTIVES


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


@pytest.mark.parametrize("preset", ["comoe", "moe", "mixlora"])
def test_layer_and_objectives_never_read_device_values_on_the_host(preset):
    """On meta tensors (shapes, no values) any host read of a value (bool(), .item(), nonzero, boolean
    indexing) raises: forward, auxiliary losses and backward running there means none happens, so on a
    GPU nothing stalls the queue (measured: such reads made the comoe step 3x slower than moe's on an H100).
    The moelora objective samples a data-dependent number of tokens and is left out."""
    config = ComoeConfig.preset(preset, r=4, lora_dropout=0.0, expert_compute="blocks")
    context = ComoeContext()
    context.keep_records = True
    layer = ComoeLinear(nn.Linear(16, 16), config, context).to("meta")
    out = layer(torch.randn(12, 16, device="meta"))
    record = dataclasses.replace(layer.record, mask=torch.ones(12, dtype=torch.bool, device="meta"))
    losses = auxiliary_losses([record], config)
    (out.sum() + losses["balance"] + losses["contrastive"]).backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.device.type == "meta"
