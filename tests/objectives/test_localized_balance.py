"""LoRAMoE's localized balancing constraint: the fast path against the plain reference in value and
gradient, a value worked by hand, the task -> type map, and the objective through a model's call."""

import pytest
import torch

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.moe.record import LayerRecord
from comoe.moe.routing import route
from comoe.objectives.auxiliary import requirements
from comoe.objectives.localized_balance import (
    LORAMOE,
    knowledge_flags,
    localized_balance_loss,
    loramoe_objective,
    type_coefficients,
)
from comoe.objectives.reference import localized_balance_loss as reference_loss
from comoe.objectives.registry import get_objective
from tests.helpers import tiny_llama


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "experts", "masked"), [(3, 6, True), (2, 5, False), (1, 8, True), (4, 2, False)])
def test_the_fast_path_is_the_reference_in_value_and_gradient(dtype, rows, experts, masked):
    generator = torch.Generator().manual_seed(rows * experts)
    logits = (2 * torch.randn(rows * 7, experts, generator=generator)).to(dtype).requires_grad_()
    probs = torch.softmax(logits, -1)
    knowledge = torch.rand(rows, generator=generator) > 0.5
    mask = torch.rand(rows * 7, generator=generator) > 0.3 if masked else None
    fast = localized_balance_loss(probs, knowledge, mask, delta=0.2)
    reference = reference_loss(probs, knowledge, mask, delta=0.2)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, reference, **tolerance)
    assert fast.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype) and float(fast) > 0
    (got,) = torch.autograd.grad(fast, logits, retain_graph=True)
    (want,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(got, want, **tolerance)
    if masked:
        assert torch.all(got[~mask] == 0)  # padding adds no importance


def test_a_value_worked_by_hand():
    # one knowledge example of 5 tokens, uniform gates over 4 experts: Q = 5/4 each, Z = Q * (0.9, 0.9,
    # 1.1, 1.1); the mean is 5/4 and the unbiased variance 4 (0.1 * 5/4)^2 / 3, so CV^2 = 0.04 / 3
    probs = torch.full((5, 4), 0.25, dtype=torch.float64)
    loss = localized_balance_loss(probs, torch.tensor([True]), delta=0.1)
    assert float(loss) == pytest.approx(0.04 / 3, rel=1e-9)
    # delta = 0 and balanced gates: no variance at all
    assert float(localized_balance_loss(probs, torch.tensor([False]), delta=0.0)) == pytest.approx(0.0)
    # one expert takes every gate: Z = (5, 0, 0, 0) on a downstream example, CV^2 = (var) / mean^2 = 4
    collapsed = torch.zeros(5, 4, dtype=torch.float64)
    collapsed[:, 0] = 1
    assert float(localized_balance_loss(collapsed, torch.tensor([False]), delta=0.0)) == pytest.approx(4.0)
    coefficients = type_coefficients(torch.tensor([True, False]), 5, 0.1)
    torch.testing.assert_close(coefficients, torch.tensor([[0.9, 0.9, 1.1, 1.1, 1.1], [1.1, 1.1, 0.9, 0.9, 0.9]]))
    with pytest.raises(ValueError, match="7 tokens are not whole sequences of the 2 examples"):
        localized_balance_loss(torch.rand(7, 4), torch.tensor([True, False]))


def test_tasks_map_to_types_through_the_vocabulary():
    config = ComoeConfig.preset("loramoe", tasks=["qa", "wiki", "sum"], knowledge_tasks=["wiki"])
    flags = knowledge_flags(config, torch.tensor([0, 1, 2, -1]))
    assert flags.tolist() == [False, True, False, False]  # -1 (a task outside the vocabulary): downstream
    with pytest.raises(ValueError, match="tasks: null; the loramoe objective"):
        knowledge_flags(ComoeConfig.preset("loramoe"), torch.tensor([0]))
    routing = route(torch.randn(4, 8), top_k=8, soft=True)
    record = LayerRecord(routing, torch.zeros(4, 8, 4), None, torch.zeros(8, 4, 3))
    with pytest.raises(ValueError, match="loramoe needs each sequence's task id"):
        loramoe_objective(record, config)


def test_it_is_registered_needs_task_ids_and_only_loramoe_asks_for_them():
    assert get_objective("loramoe") is LORAMOE and LORAMOE.component == "localized_balance"
    assert "task_ids" in requirements(ComoeConfig.preset("loramoe"))
    assert "task_ids" not in requirements(ComoeConfig.preset("comoe"))
    assert get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", r=4)).call_input_names == frozenset()


def test_the_objective_of_a_call_is_the_layers_mean_of_the_reference():
    torch.manual_seed(0)
    config = ComoeConfig.preset("loramoe", tasks=["qa", "wiki"], knowledge_tasks=["wiki"], lora_dropout=0.0)
    model = get_comoe_model(tiny_llama(), config).train()
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    task_ids = torch.tensor([1, 0, -1])
    with model.record_routing() as records:
        out = model(input_ids=ids, attention_mask=mask, labels=ids, task_ids=task_ids)
    assert len(records) == 2 * 3 and all(torch.equal(r.task_ids, task_ids) for r in records.values())
    knowledge = torch.tensor([True, False, False])
    expected = torch.stack(
        [reference_loss(r.routing.probs, knowledge, r.mask, delta=0.1) for r in records.values()]
    ).mean()
    weighted = model.weighted_aux_parts["localized_balance"]
    torch.testing.assert_close(weighted, 0.1 * expected)
    assert model.last_aux_losses()["localized_balance"] == pytest.approx(float(expected), rel=1e-5)
    out.loss.backward()
    router = next(iter(model.comoe_layers().values())).router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    # the routing itself (soft) needs no task ids: inference without them runs, losses need them
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="task_ids: missing"):
        model(input_ids=ids, attention_mask=mask, labels=ids)


def test_a_loramoe_adapter_saves_its_task_settings_and_loads_to_the_same_logits(tmp_path):
    torch.manual_seed(0)
    config = ComoeConfig.preset("loramoe", tasks=["qa", "wiki"], knowledge_tasks=["wiki"], lora_dropout=0.0)
    model = get_comoe_model(tiny_llama(), config)
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits  # inference needs no task ids
    model.save_pretrained(tmp_path)
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.comoe_config == model.comoe_config and loaded.comoe_config.knowledge_tasks == ["wiki"]
    assert loaded.call_input_names == {"task_ids"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, before)
