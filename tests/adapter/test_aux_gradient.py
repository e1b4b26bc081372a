"""The auxiliary losses reach the gradients whoever computes the task loss: carried by the backbone's
output when the caller computes it from hidden states or logits, weighted per micro-batch as the task
loss is when Trainer normalises over a whole optimizer step, and left to comoe's own loop when it asks."""

import pytest
import torch
import torch.nn.functional as F

from comoe.adapter.aux_gradient import carry_aux_gradient
from comoe.adapter.model import ComoeModel, get_comoe_model
from comoe.config import ComoeConfig
from tests.helpers import tiny_llama


def model_and_batch(seed: int = 0) -> tuple[ComoeModel, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    config = ComoeConfig.preset("comoe", r=4, lora_dropout=0.0, contrastive_weight=0.5, balance_weight=0.3)
    model = get_comoe_model(tiny_llama(), config)
    for layer in model.comoe_layers().values():  # experts away from B = 0, so every term has a gradient
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def gradients(model: ComoeModel, loss: torch.Tensor, retain: bool = False) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=retain)])


def logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A caller's own task loss from the logits (what a trainer without `labels` in the call computes)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def test_carry_equals_adding_the_scaled_loss():
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    hidden = x @ w
    aux = (w**2).sum() * 0.1
    target = torch.randn(3, 4)
    carried = carry_aux_gradient(hidden, aux, 0.25)
    assert torch.equal(carried, hidden)
    got = torch.autograd.grad(((carried - target) ** 2).sum(), [x, w], retain_graph=True)
    expected = torch.autograd.grad(((hidden - target) ** 2).sum() + 0.25 * aux, [x, w])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_a_caller_computing_the_loss_from_logits_gets_the_auxiliary_gradient():
    model, batch = model_and_batch()
    model.train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    task = logits_loss(model(**inputs).logits, batch["labels"])
    carried = model.take_carried_aux_loss()
    got = gradients(model, task)
    with model.caller_adds_aux_loss():  # the reference: the caller adds the weighted auxiliary loss
        task_only = logits_loss(model(**inputs).logits, batch["labels"])
    assert model.take_carried_aux_loss() is None
    aux = model.weighted_aux_loss
    assert float(aux) > 0 and carried is not None
    assert float(carried) == pytest.approx(float(aux), rel=1e-6)
    without = gradients(model, task_only, retain=True)
    torch.testing.assert_close(got, gradients(model, task_only + aux))
    assert (got - without).norm() > 1e-3 * without.norm()  # the auxiliary part is not negligible


def test_a_direct_backbone_call_carries_it_with_the_scale():
    model, batch = model_and_batch()
    model.train()
    model.aux_gradient_scale = 0.5
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    def head_loss() -> torch.Tensor:  # TRL's fused head: the backbone, then the LM head by the caller
        hidden = model.base_model(**inputs).last_hidden_state
        return logits_loss(model.get_output_embeddings()(hidden), batch["labels"])

    got = gradients(model, head_loss())
    assert float(model.take_carried_aux_loss()) == pytest.approx(0.5 * float(model.weighted_aux_loss))
    with model.caller_adds_aux_loss():
        reference = head_loss() + 0.5 * model.weighted_aux_loss
    torch.testing.assert_close(got, gradients(model, reference))


def test_no_carry_in_evaluation_or_without_gradients():
    model, batch = model_and_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    model.train()
    with torch.no_grad():
        model.base_model(**inputs)
    assert model.take_carried_aux_loss() is None
    model.eval()
    model(**inputs)
    assert model.take_carried_aux_loss() is None


def test_accumulating_two_copies_of_a_micro_batch_gives_its_gradient():
    """Trainer's num_items_in_batch: the task loss is a token sum over the whole optimizer step; the
    auxiliary loss is weighted by the micro-batch's share of tokens, not added once per micro-batch."""
    model, batch = model_and_batch()
    model.train()
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    one = model(**batch, num_items_in_batch=torch.tensor(tokens)).loss
    expected = gradients(model, one)
    two = sum(model(**batch, num_items_in_batch=torch.tensor(2 * tokens)).loss for _ in range(2))
    torch.testing.assert_close(gradients(model, two), expected)
    assert float(two) == pytest.approx(float(one), rel=1e-6)


def test_labels_without_a_count_add_the_loss_once():
    model, batch = model_and_batch()
    model.train()
    output = model(**batch)
    aux = model.last_aux_losses()
    expected = aux["task"] + 0.3 * aux["balance"] + 0.5 * aux["contrastive"]
    assert float(output.loss) == pytest.approx(expected, rel=1e-5)
    assert model.take_carried_aux_loss() is None  # in the loss, not carried as well
