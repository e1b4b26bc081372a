"""comoe.training.loss: the task loss is the cross-entropy of the response tokens (against a hand-written
one), the auxiliary loss is the model's weighted one, and both are normalised over the global batch."""

from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model

from comoe import ComoeConfig, get_comoe_model
from comoe.adapter.method import method_for
from comoe.data.collate import IGNORE_INDEX
from comoe.training.distributed import SINGLE, World
from comoe.training.loss import adapter_method, aux_components, response_loss, share, shown_components
from tests.helpers import tiny_llama


@dataclass(frozen=True)
class FakeWorld(World):
    """A process of a larger world whose collective sum returns what the other processes would add."""

    others: float = 0.0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.detach().clone() + self.others


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 4:] = ids[0, 4:]
    labels[1, 3:6] = ids[1, 3:6]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def value(tensor: torch.Tensor) -> float:
    return float(tensor.detach())


def hand_cross_entropy(model, data, reduction="mean") -> torch.Tensor:
    """-log softmax(logits)[next token], over every position whose next token is labelled."""
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits.double()
    losses = []
    for row in range(data["input_ids"].shape[0]):
        for position in range(data["input_ids"].shape[1] - 1):
            target = int(data["labels"][row, position + 1])
            if target != IGNORE_INDEX:
                losses.append(-torch.log_softmax(logits[row, position], -1)[target])
    total = torch.stack(losses).sum()
    return total / len(losses) if reduction == "mean" else total


def comoe_model(**fields):
    model = get_comoe_model(tiny_llama(), ComoeConfig(r=2, lora_dropout=0.0, **fields))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.3)
    return model


def test_the_task_loss_is_the_response_cross_entropy_and_aux_the_models_weighted_loss():
    model = comoe_model(contrastive="comoe", contrastive_weight=0.5, balance_weight=0.25).train()
    data = batch()
    task, aux = response_loss(model, data)
    assert torch.equal(aux, model.weighted_aux_loss) and value(aux) > 0 and aux.requires_grad
    components = aux_components(model)
    with torch.no_grad():
        model.eval()
        expected = hand_cross_entropy(model, data)
    assert value(task) == pytest.approx(value(expected), rel=1e-5)
    assert set(components) == {"balance", "contrastive"} and "task" not in components
    assert value(aux) == pytest.approx(
        0.5 * components["contrastive"] + 0.25 * components["balance"], rel=1e-5
    )


def test_the_task_loss_is_not_also_given_the_aux_loss():
    """Inside response_loss the model leaves the auxiliary loss to the caller: the task loss has no part
    of it, whatever the weights."""
    data = batch()
    light = comoe_model(contrastive="comoe", contrastive_weight=1e-6).train()
    heavy = comoe_model(contrastive="comoe", contrastive_weight=10.0).train()
    task_light, aux_light = response_loss(light, data)
    task_heavy, aux_heavy = response_loss(heavy, data)
    assert value(task_light) == pytest.approx(value(task_heavy), rel=1e-6)
    assert value(aux_heavy) > 1e5 * value(aux_light)


def test_peft_lora_has_no_auxiliary_loss():
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    ).train()
    data = batch()
    task, aux = response_loss(model, data)
    with torch.no_grad():
        model.eval()
        expected = hand_cross_entropy(model, data)
    assert value(task) == pytest.approx(value(expected), rel=1e-5)
    assert value(aux) == 0.0 and aux_components(model) == {"balance": 0.0, "contrastive": 0.0}


def test_over_processes_each_part_is_its_share_of_the_global_mean():
    model = comoe_model(contrastive="comoe").train()
    data = batch()
    single_task, single_aux = response_loss(model, data)
    tokens = int((data["labels"][:, 1:] != IGNORE_INDEX).sum())  # 5 + 3 predicted tokens
    real = int(data["attention_mask"].sum())
    world = FakeWorld(rank=0, size=2, others=24.0)  # the other process holds 24 of each
    task, aux = response_loss(model, data, world)
    with torch.no_grad():
        model.eval()
        total = hand_cross_entropy(model, data, reduction="sum")
    # DDP averages the two processes' gradients: each contributes sum * size / global count
    assert value(task) == pytest.approx(value(total) * 2 / (tokens + 24), rel=1e-5)
    assert value(aux) == pytest.approx(value(single_aux) * real * 2 / (real + 24), rel=1e-5)
    assert value(single_task) == pytest.approx(value(total) / tokens, rel=1e-5)


def test_share_is_count_times_size_over_the_global_count():
    assert share(7, SINGLE) == 1.0
    assert share(8, FakeWorld(rank=1, size=2, others=8.0)) == pytest.approx(1.0)  # equal halves
    assert share(6, FakeWorld(rank=0, size=4, others=18.0)) == pytest.approx(6 * 4 / 24)


def test_a_model_without_an_adapter_is_a_type_error():
    with pytest.raises(TypeError, match="^LlamaForCausalLM carries no comoe or PEFT LoRA adapter$"):
        adapter_method(tiny_llama())
    with pytest.raises(TypeError):
        response_loss(tiny_llama(), batch())


@pytest.mark.parametrize(
    ("preset", "shown"),
    [
        ("comoe", ["task", "contrastive"]),
        ("moelora", ["task", "balance", "contrastive"]),
        ("mixlora", ["task", "balance"]),
        ("omoe", ["task"]),
        ("moelora-liu", ["task"]),
        ("lora", ["task"]),
    ],
)
def test_the_progress_bar_shows_the_components_the_adapter_computes(preset, shown):
    """The progress bar names the adapter's own components: each one shown is computed (nonzero after a
    training forward), and each one left out (balance, contrastive for methods without them) is 0."""
    config = ComoeConfig.preset("comoe" if preset == "lora" else preset, r=2, tasks=["a"])
    model = method_for(preset).build(tiny_llama(), config, False).train()
    data = batch()
    if preset == "moelora-liu":
        data["task_ids"] = torch.zeros(2, dtype=torch.long)
    response_loss(model, data)
    assert shown_components(model) == shown
    computed = aux_components(model)
    assert all(computed[name] != 0.0 for name in shown[1:])
    assert all(value == 0.0 for name, value in computed.items() if name not in shown)
