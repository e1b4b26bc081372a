"""comoe.models.head: the LM head applied at labelled positions only gives the model's own logits there
(soft-capped where the family caps them), through a comoe adapter and a DDP-style wrapper alike."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from comoe import ComoeConfig, get_comoe_model
from comoe.data.collate import IGNORE_INDEX
from comoe.models.head import head_logits, response_logits, unwrap_model
from tests.helpers import tiny_llama


class Wrapper(nn.Module):
    """What DistributedDataParallel looks like from outside: the model under `.module`, called through."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 6 + [0]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3:] = ids[0, 3:]  # responses of different lengths after prompts
    labels[1, 2:5] = ids[1, 2:5]
    labels[2, 0:6] = ids[2, 0:6]  # a label at position 0 has no position that predicts it
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_unwrap_model_takes_the_module_out_of_a_wrapper():
    model = tiny_llama()
    assert unwrap_model(model) is model and unwrap_model(Wrapper(model)) is model


def test_response_logits_are_the_full_logits_at_positions_predicting_a_label():
    model = tiny_llama()
    data = batch()
    with torch.no_grad():
        logits, targets = response_logits(model, data)
        full = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    expected_rows = (
        [(0, p) for p in range(2, 6)] + [(1, p) for p in range(1, 4)] + [(2, p) for p in range(0, 5)]
    )
    assert logits.shape == (len(expected_rows), 128) and logits.dtype == torch.float32
    assert targets.tolist() == [int(data["input_ids"][r, p + 1]) for r, p in expected_rows]
    reference = torch.stack([full[r, p] for r, p in expected_rows])
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_through_an_adapter_and_a_wrapper_the_logits_are_the_adapted_models():
    model = get_comoe_model(tiny_llama(), ComoeConfig(r=2, lora_dropout=0.0)).eval()
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.5)
    data = batch()
    with torch.no_grad():
        logits, targets = response_logits(Wrapper(model), data)
        full = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        plain, _ = response_logits(tiny_llama(), data)
    labelled = data["labels"][:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(logits, full[:, :-1][labelled], rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, data["labels"][:, 1:][labelled])
    assert not torch.allclose(logits, plain)  # the experts changed them


def test_head_logits_apply_the_output_embedding_in_float32():
    model = tiny_llama()
    hidden = torch.randn(5, 64, dtype=torch.float32)
    torch.testing.assert_close(head_logits(model, hidden), hidden @ model.lm_head.weight.t())
    half = model.to(torch.bfloat16)
    out = head_logits(half, hidden.bfloat16())
    assert out.dtype == torch.float32


@pytest.mark.parametrize("nested", [False, True])
def test_soft_capped_families_get_tanh_capped_logits(nested):
    model = tiny_llama()
    hidden = torch.randn(4, 64) * 20
    raw = hidden @ model.lm_head.weight.t()
    if nested:  # multimodal configs keep the text model's settings under text_config
        model.config.text_config = SimpleNamespace(final_logit_softcapping=3.0)
    else:
        model.config.final_logit_softcapping = 3.0
    capped = head_logits(Wrapper(model), hidden)
    torch.testing.assert_close(capped, torch.tanh(raw / 3.0) * 3.0)
    assert capped.abs().max() < 3.0 < raw.abs().max()
