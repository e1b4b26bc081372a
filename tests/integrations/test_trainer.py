"""A ComoeModel inside transformers Trainer: default arguments train it with the auxiliary losses, and
ComoeTrainer's checkpoints and save_model() are adapter folders that reload and resume exactly."""

import json

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import Trainer, TrainingArguments

from comoe.adapter.method import DORA, method_of
from comoe.adapter.model import ComoeModel, get_comoe_model
from comoe.adapter.serialization import CONFIG_NAME, WEIGHTS_NAME
from comoe.config import ComoeConfig
from comoe.integrations.trainer import ComoeTrainer
from tests.helpers import assert_auxiliary_gradient, tiny_llama, trainer_fields


def dataset(rows: int = 16, length: int = 12) -> Dataset:
    """Token rows with a masked prompt (labels -100 on the first 4 positions) and an extra column."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (rows, length), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": labels.tolist(),
            "source": ["a"] * rows,  # not a forward argument: Trainer must drop it, and only it
        }
    )


def comoe_model(seed: int = 0) -> ComoeModel:
    base = tiny_llama(seed=0)
    torch.manual_seed(seed)  # the experts' and routers' init
    return get_comoe_model(base, ComoeConfig.preset("comoe", r=4, lora_dropout=0.0))


def arguments(folder, **overrides) -> TrainingArguments:
    return TrainingArguments(**trainer_fields(folder, **overrides))


def adapter_tensors(model: ComoeModel) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.adapter_state_dict().items()}


def test_plain_trainer_with_default_arguments_trains_with_the_auxiliary_losses(tmp_path):
    model = comoe_model()
    before = adapter_tensors(model)
    trainer = Trainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=dataset())
    trainer.train()  # default remove_unused_columns=True: the forward signature keeps input_ids and labels
    after = adapter_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    losses = model.last_aux_losses()
    assert losses["contrastive"] > 0  # the last forward computed the objective
    logged = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert logged and all(loss > 0 for loss in logged)


def one_step(folder, rows: int, trainer=Trainer, **overrides) -> tuple[dict[str, torch.Tensor], list]:
    """The adapter after one SGD step (a step proportional to the gradient) on `rows` copies of a row,
    and the step's log rows."""
    model = comoe_model()
    fields = dict(
        max_steps=1, per_device_train_batch_size=2, optim="sgd", save_strategy="no", logging_steps=1
    )
    args = arguments(folder, **{**fields, **overrides})
    run = trainer(model=model, args=args, train_dataset=dataset(rows=1).select([0] * rows))
    run.train()
    return adapter_tensors(model), [row for row in run.state.log_history if "loss" in row]


def assert_loss_is_its_components(rows: list[dict], config: ComoeConfig) -> None:
    """Each logged loss is the logged task loss plus the weighted auxiliary losses."""
    assert rows
    for row in rows:
        total = (
            row["task"]
            + config.balance_weight * row["balance"]
            + config.contrastive_weight * row["contrastive"]
        )
        assert row["task"] > 0 and row["loss"] == pytest.approx(total, rel=1e-3)


@pytest.mark.parametrize(
    "smoothing, accumulating",
    [(0.0, Trainer), (0.0, ComoeTrainer), (0.1, ComoeTrainer)],
    ids=["model-loss", "model-loss-comoe-trainer", "label-smoothing"],
)
def test_accumulating_two_copies_of_a_batch_takes_its_step(tmp_path, smoothing, accumulating):
    """Gradient accumulation keeps the auxiliary losses' weight. With the model's loss, Trainer passes
    num_items_in_batch and does not divide by the number of micro-batches: each micro-batch's auxiliary
    loss is weighted by its share of tokens. With label smoothing Trainer computes the loss from the logits
    and the backbone's output carries the auxiliary gradient, averaged over the micro-batches by
    ComoeTrainer (a plain Trainer cannot tell the model that it accumulates). ComoeTrainer's logged task
    loss is on the step's scale either way."""
    one, _ = one_step(tmp_path / "one", 2, label_smoothing_factor=smoothing)
    two, rows = one_step(
        tmp_path / "two", 4, accumulating, gradient_accumulation_steps=2, label_smoothing_factor=smoothing
    )
    initial = adapter_tensors(comoe_model())
    assert any(not torch.equal(one[name], initial[name]) for name in one)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-7, msg=name)
    if accumulating is ComoeTrainer:
        assert_loss_is_its_components(rows, comoe_model().comoe_config)


def test_plain_trainer_with_label_smoothing_includes_the_auxiliary_gradient(tmp_path):
    """With label smoothing Trainer calls the model without labels and computes the loss itself."""
    model = comoe_model()
    args = arguments(tmp_path, label_smoothing_factor=0.1, per_device_train_batch_size=2, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=dataset())
    trainer.train()  # experts away from their B = 0 start
    assert_auxiliary_gradient(trainer, model)


def test_comoe_trainer_logs_components_and_checkpoints_are_adapter_folders(tmp_path):
    model = comoe_model()
    trainer = ComoeTrainer(model=model, args=arguments(tmp_path / "run"), train_dataset=dataset())
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(set(row) >= {"task", "balance", "contrastive"} for row in rows)
    assert all(row["contrastive"] > 0 for row in rows)
    assert_loss_is_its_components(rows, model.comoe_config)
    for step in (2, 4):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        assert (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()
        assert not (folder / "model.safetensors").exists()  # the adapter, not the whole model
    trainer.save_model(str(tmp_path / "final"))
    config = json.loads((tmp_path / "final" / CONFIG_NAME).read_text())
    assert config["adapter_type"] == "comoe" and "comoe_version" in config
    reloaded = ComoeModel.from_pretrained(tiny_llama(seed=0), tmp_path / "final")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_comoe_trainer_resume_gives_the_uninterrupted_adapter(tmp_path):
    whole = comoe_model()
    ComoeTrainer(model=whole, args=arguments(tmp_path / "a"), train_dataset=dataset()).train()
    resumed = comoe_model(seed=1)  # another init: everything must come from the checkpoint
    trainer = ComoeTrainer(model=resumed, args=arguments(tmp_path / "a"), train_dataset=dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    expected, got = adapter_tensors(whole), adapter_tensors(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name


def test_unsupported_adapter_management_raises_instead_of_reaching_the_wrapped_model():
    model = comoe_model()
    for name in ("set_adapter", "add_adapter", "load_adapter", "active_adapters"):
        assert not hasattr(model, name)
        with pytest.raises(AttributeError, match=f"ComoeModel.{name}: not supported"):
            getattr(model, name)
    assert model.config is model.wrapped_model.config  # other names still reach the wrapped model
    assert model.base_model is model.wrapped_model.model  # transformers: base_model is the backbone


@pytest.mark.parametrize("trainer_class", [Trainer, ComoeTrainer])
def test_eval_loss_is_the_task_loss_as_comoe_validation_reports_it(tmp_path, trainer_class):
    """In evaluation the auxiliary losses are reported, not added: Trainer's eval_loss is the mean task
    cross-entropy, the quantity of comoe's own validation loss (docs/data.md)."""
    torch.manual_seed(0)
    base = tiny_llama(seed=0)
    model = get_comoe_model(base, ComoeConfig.preset("mixlora", r=4, lora_dropout=0.0, balance_weight=5.0))
    data = dataset(rows=8)
    trainer = trainer_class(model=model, args=arguments(tmp_path, save_strategy="no"), eval_dataset=data)
    metrics = trainer.evaluate()
    model.eval()
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        task = model(**batch).loss
    assert model.last_aux_losses()["balance"] > 0.9  # 5 x balance would have moved eval_loss by > 4.5
    assert float(task) == pytest.approx(model.last_aux_losses()["task"])
    assert metrics["eval_loss"] == pytest.approx(float(task), rel=1e-4)


def test_a_hydralora_model_with_the_router_z_loss_trains_in_comoe_trainer_and_reloads(tmp_path):
    config = ComoeConfig.preset("hydralora", lora_dropout=0.0, aux_objectives={"router_z": 0.001})
    base = tiny_llama(seed=0)
    torch.manual_seed(0)
    model = get_comoe_model(base, config)
    before = adapter_tensors(model)
    args = arguments(tmp_path / "run", max_steps=2, save_strategy="no")
    trainer = ComoeTrainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(row["router_z"] > 0 for row in rows)
    for row in rows:
        assert row["loss"] == pytest.approx(row["task"] + 0.001 * row["router_z"], rel=1e-3)
    after = adapter_tensors(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith(("lora_B", "router.weight")))
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / CONFIG_NAME).read_text())
    assert (saved["expert_bank"], saved["routing"]) == ("hydra", "soft")
    reloaded = ComoeModel.from_pretrained(tiny_llama(seed=0), tmp_path / "final")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_dora_baseline_trains_in_comoe_trainer_and_saves_a_peft_folder(tmp_path):
    base = tiny_llama(seed=0)
    model = DORA.build(base, ComoeConfig.preset("comoe", r=4, lora_dropout=0.0), False)
    assert method_of(model) is DORA
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    trainer = ComoeTrainer(model=model, args=arguments(tmp_path / "run", max_steps=2), train_dataset=dataset())
    trainer.train()
    assert [row["loss"] > 0 for row in trainer.state.log_history if "loss" in row] == [True]
    moved = {n: p for n, p in model.named_parameters() if "magnitude" in n}
    assert magnitudes and all(not torch.equal(magnitudes[n], moved[n]) for n in magnitudes)  # m trains
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = json.loads((checkpoint / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["use_dora"]) == ("LORA", True)
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), checkpoint)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


# Routed presets of the method zoo with their tiny-model overrides (omoe: n * r must fit the 32 k/v outputs)
ZOO = {"omoe": dict(r=8), "mola": dict(), "adamole": dict(), "milora": dict(), "mixlora-ffn": dict(), "comoe-dora": dict(r=4)}


@pytest.mark.parametrize("preset", list(ZOO))
def test_the_zoos_routed_presets_train_in_comoe_trainer_and_reload(tmp_path, preset):
    torch.manual_seed(0)
    model = get_comoe_model(tiny_llama(seed=0), ComoeConfig.preset(preset, lora_dropout=0.0, **ZOO[preset]))
    before = adapter_tensors(model)
    trainer = ComoeTrainer(
        model=model, args=arguments(tmp_path / "run", max_steps=2, save_strategy="no"), train_dataset=dataset()
    )
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(row["task"] > 0 for row in rows)
    after = adapter_tensors(model)
    assert [k for k in before if not torch.equal(before[k], after[k])]  # the step moved the adapter
    trainer.save_model(str(tmp_path / "final"))
    reloaded = ComoeModel.from_pretrained(tiny_llama(seed=0), tmp_path / "final")
    assert reloaded.comoe_config == model.comoe_config
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("preset", ["moelora-liu", "loramoe"])
def test_task_routed_presets_keep_the_task_ids_column_in_comoe_trainer(tmp_path, preset):
    torch.manual_seed(0)
    config = ComoeConfig.preset(preset, tasks=["a", "b", "c"], knowledge_tasks=["b"], lora_dropout=0.0)
    model = get_comoe_model(tiny_llama(seed=0), config)
    data = dataset().add_column("task_ids", [0, 1] * 8)  # tasks a and b only
    before = adapter_tensors(model)
    trainer = ComoeTrainer(
        model=model, args=arguments(tmp_path / "run", max_steps=2, save_strategy="no"), train_dataset=data
    )
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(row["task"] > 0 for row in rows)
    if preset == "loramoe":
        assert all(row["localized_balance"] > 0 for row in rows)
    after = adapter_tensors(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved
    if preset == "moelora-liu":  # the embeddings of the tasks trained moved, task c's did not
        key = next(k for k in before if k.endswith("task_embedding.weight"))
        assert not torch.equal(before[key][:2], after[key][:2]) and torch.equal(before[key][2], after[key][2])
