"""The objective registry: the names ComoeConfig accepts are exactly the registered objectives, and the
auxiliary losses of a forward are the per-layer objectives averaged over layers."""

import pytest
import torch
from torch import nn

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import CONTRASTIVES, ComoeConfig
from comoe.objectives.auxiliary import CONTRASTIVE_OBJECTIVES, auxiliary_losses, contrastive_loss
from comoe.objectives.reference import load_balance_loss


def test_config_choices_are_the_registered_objectives():
    assert set(CONTRASTIVES) == {"none", *CONTRASTIVE_OBJECTIVES}


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
