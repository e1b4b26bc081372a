"""The objective seam: a toy objective registered from a test (no other module edited) is configured as
{name: weight}, computed on every adapted layer, added to the loss and reported under its component by the
model, the training loop's log and the errors of misuse."""

import json

import pytest
import torch

from comoe import ComoeConfig, get_comoe_model
from comoe.objectives.auxiliary import active_objectives, compute_auxiliary_losses, requirements
from comoe.objectives.registry import OBJECTIVES, Objective, register_objective, unregister_objective
from comoe.training.loop import train
from comoe.training.settings import TrainArgs
from tests.helpers import tiny_llama


def orthogonality(record, config):
    """A toy regulariser: mean squared off-diagonal Gram entry between experts' B blocks."""
    gram = record.gram
    n = record.lora_B.shape[0]
    r = gram.shape[0] // n
    blocks = gram.view(n, r, n, r).pow(2).sum(dim=(1, 3))
    return (blocks.sum() - blocks.diagonal().sum()) / (n * (n - 1))


def pairwise_overlap(lora_B):
    """The toy regulariser computed plainly: mean over expert pairs i != j of |B_i B_j^T|_F^2."""
    n = lora_B.shape[0]
    pairs = [(lora_B[i] @ lora_B[j].t()).pow(2).sum() for i in range(n) for j in range(n) if i != j]
    return torch.stack(pairs).mean()


@pytest.fixture
def toy_objective():
    objective = register_objective(
        Objective("orthogonality", orthogonality, component="orthogonality", needs=frozenset({"gram"}))
    )
    yield objective
    unregister_objective("orthogonality")


def test_a_registered_objective_enters_the_loss_with_its_weight(toy_objective):
    config = ComoeConfig.preset("moe", lora_dropout=0.0, aux_objectives={"orthogonality": 0.5})
    assert config.objective_weights == {"orthogonality": 0.5}
    model = get_comoe_model(tiny_llama(), config)
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.2)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    out = model(input_ids=ids, labels=ids)
    expected = torch.stack([pairwise_overlap(layer.lora_B) for layer in model.comoe_layers().values()]).mean()
    losses = model.last_aux_losses()
    assert losses["orthogonality"] == pytest.approx(float(expected), rel=1e-5)
    assert losses["balance"] == 0.0 and losses["contrastive"] == 0.0
    assert float(out.loss) == pytest.approx(losses["task"] + 0.5 * float(expected), rel=1e-5)
    out.loss.backward()  # the regulariser's gradient reaches every B
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in model.comoe_layers().values())


def test_requirements_follow_the_active_objectives(toy_objective):
    assert requirements(ComoeConfig.preset("moe")) == frozenset()
    assert requirements(ComoeConfig.preset("moe", aux_objectives={"orthogonality": 1.0})) == {"gram"}
    assert requirements(ComoeConfig.preset("comoe")) == {"gram", "norm_floor"}
    assert requirements(ComoeConfig.preset("comoe", contrastive_norm_floor=0.0)) == {"gram"}
    # a zero weight turns an objective off
    assert active_objectives(ComoeConfig.preset("moe", aux_objectives={"orthogonality": 0.0})) == {}


def test_unknown_and_conflicting_objectives_are_refused(toy_objective):
    with pytest.raises(ValueError, match="'orthogonal' is not registered; registered: .*orthogonality"):
        get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", aux_objectives={"orthogonal": 1.0}))
    with pytest.raises(ValueError, match="'comoe' and 'moelora' both report as 'contrastive'"):
        active_objectives(ComoeConfig.preset("comoe", aux_objectives={"moelora": 0.1}))
    with pytest.raises(ValueError, match="already set by balance_weight"):
        ComoeConfig.preset("mixlora", aux_objectives={"balance": 0.1})
    with pytest.raises(ValueError, match="aux_objectives\\['orthogonality'\\]=-1"):
        ComoeConfig.preset("moe", aux_objectives={"orthogonality": -1})
    with pytest.raises(ValueError, match="needs \\['hidden_states'\\] unknown"):
        Objective("bad", orthogonality, component="bad", needs=frozenset({"hidden_states"}))


def test_the_built_in_objectives_are_registered_with_their_components():
    assert {name: OBJECTIVES[name].component for name in ("balance", "comoe", "moelora")} == {
        "balance": "balance",
        "comoe": "contrastive",
        "moelora": "contrastive",
    }
    config = ComoeConfig.preset("moelora")
    assert config.objective_weights == {"balance": 0.01, "moelora": 0.01}


def test_the_training_log_reports_every_active_component(toy_objective, tiny_model_dir, tmp_path):
    args = TrainArgs(
        model=str(tiny_model_dir),
        preset="moe",
        adapter_config={"aux_objectives": {"orthogonality": 1.0}, "r": 4},
        train_limit=4,
        max_steps=2,
        batch_size=2,
        cutoff=48,
        stats_steps=0,
        save_steps=0,
        output=str(tmp_path / "run"),
    )
    run = train(args)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["orthogonality"] >= 0 for row in rows)
    assert rows[-1]["orthogonality"] > 0  # B moved away from zero after the first step
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["aux_objectives"] == {"orthogonality": 1.0}


def test_compute_auxiliary_losses_without_records_is_zero():
    losses = compute_auxiliary_losses([], ComoeConfig.preset("mixlora"))
    assert float(losses.total) == 0.0 and set(losses.values) == {"balance", "contrastive"}
