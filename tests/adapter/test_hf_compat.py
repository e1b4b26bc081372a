"""What transformers and PEFT expect of the model: the wrapped forward's signature, refused adapter
names, and gradient checkpointing that keeps the auxiliary gradient."""

import inspect

import pytest

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.hf_compat import UNSUPPORTED, UnsupportedOperation
from tests.helpers import tiny_llama


def test_forward_carries_the_wrapped_signature_and_the_class_a_causal_lm_one():
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", r=4))
    assert inspect.signature(model.forward) == inspect.signature(model.wrapped_model.forward)
    assert list(inspect.signature(ComoeModel.forward).parameters)[:4] == [
        "self",
        "input_ids",
        "attention_mask",
        "labels",
    ]


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_peft_adapter_management_is_refused_by_name(name):
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", r=4))
    assert not hasattr(model, name)
    with pytest.raises(UnsupportedOperation, match=f"ComoeModel.{name}: not supported"):
        getattr(model, name)


def test_reentrant_checkpointing_is_refused_only_when_objectives_are_on():
    with_aux = get_comoe_model(tiny_llama(), ComoeConfig.preset("comoe", r=4))
    with pytest.raises(ValueError, match="use_reentrant=True runs the blocks without autograd"):
        with_aux.gradient_checkpointing_enable({"use_reentrant": True})
    without = get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", r=4))
    without.gradient_checkpointing_enable({"use_reentrant": True})
    assert without.wrapped_model.is_gradient_checkpointing
