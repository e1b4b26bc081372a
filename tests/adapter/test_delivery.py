"""Loss delivery, one mode per call: the mode chosen for each kind of call, and what each mode does with
the auxiliary losses (unit-tested on LossDelivery alone, then through the model)."""

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from comoe import ComoeConfig, get_comoe_model
from comoe.adapter.delivery import Delivery, LossDelivery, choose_delivery
from comoe.objectives.auxiliary import AuxiliaryLosses
from tests.helpers import tiny_llama


@pytest.mark.parametrize(
    ("wants", "labels", "caller", "carry", "direct", "training", "mode"),
    [
        (False, True, False, True, False, True, Delivery.NONE),  # adapters off, or evaluation without labels
        (True, True, False, True, False, True, Delivery.INTO_LOSS),
        (True, True, False, True, False, False, Delivery.REPORTED),  # evaluation with labels: loss = task
        (True, True, True, True, False, True, Delivery.INTO_LOSS),  # labels win over the caller's block
        (True, False, True, True, False, True, Delivery.TO_CALLER),
        (True, False, False, True, False, True, Delivery.CARRIED),
        (True, False, False, False, False, True, Delivery.TO_CALLER),  # no backbone to carry on
        (True, True, False, True, True, True, Delivery.CARRIED),  # a direct backbone call never sees labels
        (True, False, True, True, True, True, Delivery.TO_CALLER),
    ],
)
def test_the_mode_of_each_kind_of_call(wants, labels, caller, carry, direct, training, mode):
    got = choose_delivery(
        wants_aux=wants, has_labels=labels, caller_adds=caller, can_carry=carry, direct=direct, training=training
    )
    assert got is mode


def losses(value: float) -> AuxiliaryLosses:
    leaf = torch.tensor(value, requires_grad=True)
    return AuxiliaryLosses({"balance": leaf * 1.0, "contrastive": leaf * 0.0}, {"balance": leaf * 2.0})


def test_into_loss_adds_the_weighted_loss_times_its_share_and_keeps_the_task():
    delivery = LossDelivery()
    delivery.keep(losses(0.5))
    output = CausalLMOutputWithPast(loss=torch.tensor(3.0))
    delivery.into_loss(output, 0.25)
    assert float(output.loss) == pytest.approx(3.0 + 0.25 * 1.0)
    assert delivery.components() == {"task": 3.0, "balance": 0.5, "contrastive": 0.0}
    assert float(delivery.take_in_loss()) == pytest.approx(0.25)
    assert delivery.take_in_loss() is None  # taken once
    no_loss = CausalLMOutputWithPast(loss=None)
    delivery.into_loss(no_loss, 1.0)
    assert no_loss.loss is None


def test_carried_sends_the_scaled_gradient_through_the_hidden_state():
    delivery = LossDelivery()
    delivery.aux_gradient_scale = 0.5
    leaf = torch.tensor(2.0, requires_grad=True)
    delivery.keep(AuxiliaryLosses({"balance": leaf}, {"balance": 3.0 * leaf}))
    hidden = torch.ones(1, 2, 3, requires_grad=True)
    output = delivery.carry(BaseModelOutputWithPast(last_hidden_state=hidden * 1.0))
    output.last_hidden_state.sum().backward()
    assert float(leaf.grad) == pytest.approx(0.5 * 3.0)  # d(scale * weighted)/d(leaf)
    assert torch.equal(hidden.grad, torch.ones(1, 2, 3))  # the caller's gradient unchanged
    assert float(delivery.take_carried()) == pytest.approx(0.5 * 6.0)
    with torch.no_grad():  # nothing recorded: nothing carried
        untouched = BaseModelOutputWithPast(last_hidden_state=torch.ones(1, 2, 3))
        assert delivery.carry(untouched) is untouched and delivery.take_carried() is None


def test_the_caller_block_nests_and_restores():
    delivery = LossDelivery()
    with delivery.caller_adding():
        assert delivery.caller_adds
        with delivery.caller_adding():
            pass
        assert delivery.caller_adds
    assert not delivery.caller_adds


def test_each_mode_through_the_model():
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("mixlora", r=4, lora_dropout=0.0))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    with_labels = model(input_ids=ids, labels=ids)  # INTO_LOSS
    assert float(with_labels.loss) == pytest.approx(
        model.last_aux_losses()["task"] + 0.01 * model.last_aux_losses()["balance"], rel=1e-6
    )
    with model.caller_adds_aux_loss():  # TO_CALLER: the loss is the task loss alone
        model(input_ids=ids)
    assert float(model.weighted_aux_loss) == pytest.approx(
        0.01 * model.last_aux_losses()["balance"], rel=1e-6
    )
    assert model.last_aux_losses()["task"] == 0.0 and model.take_carried_aux_loss() is None
    model(input_ids=ids)  # CARRIED
    assert float(model.take_carried_aux_loss()) == pytest.approx(float(model.weighted_aux_loss), rel=1e-6)
    model.eval()
    with torch.no_grad():
        reported = model(input_ids=ids, labels=ids)  # REPORTED: computed, the loss the task's alone
        assert float(reported.loss) == pytest.approx(model.last_aux_losses()["task"])
        assert model.last_aux_losses()["balance"] > 0.5
        model(input_ids=ids)  # NONE: nothing computed, nothing kept
    assert all(layer.record is None for layer in model.comoe_layers().values())
    assert model._call is None
