"""The contrastive objectives as registered: what they need from the forward, and the same value whether
the forward kept the Gram matrix or the objective computes it from B."""

import dataclasses

import pytest
import torch
from torch import nn

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import ComoeConfig
from comoe.objectives.auxiliary import with_grams
from comoe.objectives.contrastive import COMOE, CONTRASTIVE_NEEDS, MOELORA, record_gram


@pytest.mark.parametrize("objective", [COMOE, MOELORA])
def test_gram_kept_by_the_forward_or_computed_from_b_gives_one_value(objective):
    torch.manual_seed(0)
    config = ComoeConfig(num_experts=6, top_k=2, r=4, lora_dropout=0.0, contrastive=objective.name)
    context = ComoeContext()
    context.keep_records = True
    layer = ComoeLinear(nn.Linear(12, 10), config, context)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    layer(torch.randn(20, 12))
    assert layer.record.gram is None  # one process: the objectives take the Grams (auxiliary.with_grams)
    kept = with_grams([layer.record])[0]
    assert kept.gram is not None and objective.needs == CONTRASTIVE_NEEDS
    flat = layer.lora_B.reshape(-1, 10)
    torch.testing.assert_close(record_gram(kept), flat @ flat.t())
    torch.manual_seed(1)
    with_gram = objective.loss(kept, config)
    torch.manual_seed(1)
    without = objective.loss(dataclasses.replace(kept, gram=None), config)
    torch.testing.assert_close(with_gram, without)
