"""comoe.training.checkpoint: save then read back the adapter, optimizer moments, scheduler and RNG state;
resume from the newest intact checkpoint, skipping a corrupt one."""

import json
import logging

import pytest
import torch

from comoe import ComoeConfig, get_comoe_model
from comoe.adapter.serialization import WEIGHTS_NAME
from comoe.training.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from tests.helpers import tiny_llama

IDS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = get_comoe_model(tiny_llama(), ComoeConfig(r=2, lora_dropout=0.0, contrastive="comoe"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, steps: int) -> None:
    model.train()
    for _ in range(steps):
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def adapter(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.adapter_state_dict().items()}


def test_save_then_read_round_trips_every_part(tmp_path):
    model, optimizer, scheduler = setup()
    train_steps(model, optimizer, scheduler, 2)
    torch.manual_seed(123)
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000002"
    ]  # no temporary left
    saved = read_checkpoint(tmp_path / "checkpoints" / "step-000002")
    assert saved.step == 2 and saved.meta["step"] == 2
    assert saved.meta["param_groups"][0]["lr"] == pytest.approx(1e-2 / 3)  # after two scheduler steps
    assert saved.meta["param_groups"][0]["betas"] == [0.9, 0.999]
    assert saved.meta["scheduler"]["last_epoch"] == 2
    state = optimizer.state_dict()["state"]
    for index, slots in state.items():
        for key, value in slots.items():
            assert torch.equal(saved.optimizer[f"{index}.{key}"], value), (index, key)
    assert torch.equal(saved.optimizer["rng.torch"], torch.get_rng_state())
    live = adapter(model)
    assert saved.adapter.keys() == live.keys() and len(live) == 24  # A, B and router of 8 layers
    for name, tensor in live.items():
        assert torch.equal(saved.adapter[name], tensor), name


def test_load_restores_model_optimizer_scheduler_and_rng_so_training_continues_identically(tmp_path):
    model, optimizer, scheduler = setup()
    train_steps(model, optimizer, scheduler, 2)
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    draw = torch.rand(3)
    train_steps(model, optimizer, scheduler, 1)
    continued = adapter(model)

    fresh, fresh_optimizer, fresh_scheduler = setup(seed=7)  # different initial experts
    assert load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_scheduler) == 2
    assert torch.equal(torch.rand(3), draw)  # the RNG is where it was at the save
    assert fresh_scheduler.last_epoch == 2 and fresh_scheduler.get_last_lr() == pytest.approx([1e-2 / 3])
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    train_steps(fresh, fresh_optimizer, fresh_scheduler, 1)
    for name, tensor in adapter(fresh).items():
        torch.testing.assert_close(tensor, continued[name], rtol=1e-5, atol=1e-6)


def test_the_newest_checkpoint_wins_and_saving_a_step_again_replaces_it(tmp_path):
    model, optimizer, scheduler = setup()
    for step in (2, 10, 4):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler)
    assert latest_checkpoint(tmp_path).name == "step-000010"  # by step, not by order of writing
    assert latest_checkpoint(tmp_path / "nowhere") is None
    with torch.no_grad():
        next(iter(model.comoe_layers().values())).lora_B.fill_(0.5)
    save_checkpoint(tmp_path, 10, model, optimizer, scheduler)
    saved = read_checkpoint(tmp_path / "checkpoints" / "step-000010")
    first = next(iter(model.comoe_layers()))
    assert torch.all(saved.adapter[f"{first}.lora_B"] == 0.5)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
        "step-000010",
    ]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: (c / "trainer_state.json").write_text("{"), "trainer_state.json: not valid JSON"),
        (
            lambda c: (c / "trainer_state.json").write_text('{"step": "2"}'),
            "trainer_state.json: expected ['param_groups', 'scheduler', 'step']",
        ),
        (lambda c: (c / "trainer_state.json").unlink(), "checkpoint without trainer_state.json"),
        (lambda c: (c / "optimizer.safetensors").write_bytes(b"\0" * 10), "optimizer.safetensors"),
        (lambda c: (c / "adapter" / WEIGHTS_NAME).unlink(), WEIGHTS_NAME),
    ],
)
def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tmp_path, caplog, damage, message):
    model, optimizer, scheduler = setup()
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler)
    kept = adapter(model)
    train_steps(model, optimizer, scheduler, 1)
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler)
    newest = tmp_path / "checkpoints" / "step-000003"
    damage(newest)
    with pytest.raises((ValueError, OSError)) as info:
        read_checkpoint(newest)
    assert message in str(info.value)
    fresh, fresh_optimizer, fresh_scheduler = setup(seed=3)
    with caplog.at_level(logging.INFO, logger="comoe"):
        assert load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_scheduler) == 2
    assert any("skipping step-000003, which is unreadable" in r.getMessage() for r in caplog.records)
    for name, tensor in adapter(fresh).items():
        assert torch.equal(tensor, kept[name]), name


def test_no_checkpoint_starts_at_zero_and_none_intact_is_an_error(tmp_path, caplog):
    model, optimizer, scheduler = setup()
    with caplog.at_level(logging.WARNING, logger="comoe"):
        assert load_checkpoint(tmp_path, model, optimizer, scheduler) == 0
    assert "no checkpoint in" in caplog.text and "starting at step 0" in caplog.text
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    state = tmp_path / "checkpoints" / "step-000001" / "trainer_state.json"
    meta = json.loads(state.read_text())
    del meta["scheduler"]
    state.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"--resume: none of the 1 checkpoints in .* is intact"):
        load_checkpoint(tmp_path, model, optimizer, scheduler)


def test_a_model_without_an_adapter_cannot_take_a_checkpoint(tmp_path):
    model, optimizer, scheduler = setup()
    save_checkpoint(tmp_path, 1, model, optimizer, scheduler)
    with pytest.raises(TypeError, match="LlamaForCausalLM carries no adapter to restore"):
        load_checkpoint(tmp_path, tiny_llama(), optimizer, scheduler)
