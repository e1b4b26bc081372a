"""Compiling a model block by block: the blocks are the decoder layers, and a compiled comoe model trains
with the eager model's loss and gradients."""

import pytest
import torch
from torch import nn

from comoe import ComoeConfig, get_comoe_model
from comoe.models.compile import compile_blocks, repeated_blocks
from comoe.training.settings import TrainArgs
from tests.helpers import tiny_llama


def test_the_repeated_blocks_are_the_decoder_layers_and_a_model_without_them_is_refused():
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("comoe", r=4))
    blocks = repeated_blocks(model)
    assert blocks == list(model.wrapped_model.model.layers)
    with pytest.raises(ValueError, match="compile: Sequential names no repeated block"):
        compile_blocks(nn.Sequential(nn.Linear(2, 2)))
    assert TrainArgs(compile=True).compile and not TrainArgs().compile


@pytest.mark.slow  # inductor compiles C++ for the block (about 20 s on 2 cores)
def test_a_compiled_comoe_model_has_the_eager_loss_and_gradients():
    def trained_step(compiled):
        model = get_comoe_model(tiny_llama(), ComoeConfig.preset("comoe", r=4, lora_dropout=0.0)).train()
        with torch.no_grad():
            for layer in model.comoe_layers().values():
                layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        if compiled:
            assert compile_blocks(model) == 2
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), model.last_aux_losses(), grads

    eager_loss, eager_aux, eager_grads = trained_step(False)
    loss, aux, grads = trained_step(True)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert aux["contrastive"] == pytest.approx(eager_aux["contrastive"], rel=1e-5)
    assert set(grads) == set(eager_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6)
