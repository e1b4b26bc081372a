"""TRL's SFTTrainer with a comoe adapter: on prompt/completion and on conversational data the auxiliary
losses reach the gradients (plain SFTTrainer too, through the backbone's output), ComoeSFTTrainer logs
them, keeps their weight under gradient accumulation, writes adapter-folder checkpoints, and resumes to
the uninterrupted adapter."""

import json

import pytest
import torch
from datasets import Dataset

pytest.importorskip("trl", reason="TRL is an optional extra (pip install -e '.[integrations]')")

from trl import SFTConfig, SFTTrainer  # noqa: E402

from comoe.adapter.method import DORA  # noqa: E402
from comoe.adapter.model import ComoeModel, get_comoe_model  # noqa: E402
from comoe.adapter.serialization import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from comoe.config import ComoeConfig  # noqa: E402
from comoe.integrations.trl import ComoeSFTTrainer  # noqa: E402
from tests.helpers import assert_auxiliary_gradient, tiny_llama, trainer_fields  # noqa: E402

PROMPT_COMPLETION = Dataset.from_dict(
    {
        "prompt": ["What is 2+2?", "Name a colour.", "Spell cat backward.", "3 x 3?"] * 2,
        "completion": [" 4", " Blue", " tac", " 9"] * 2,
    }
)
MESSAGES = Dataset.from_dict(
    {
        "messages": [
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, a in [("Hi?", "Hello."), ("2+2?", "4"), ("Sky?", "Blue."), ("Cat?", "Meow.")] * 2
        ]
    }
)


def comoe_model(vocab: int, seed: int = 0) -> ComoeModel:
    base = tiny_llama(vocab=vocab)
    torch.manual_seed(seed)
    return get_comoe_model(base, ComoeConfig.preset("comoe", r=4, lora_dropout=0.0))


def config(folder, **overrides) -> SFTConfig:
    # TRL turns gradient checkpointing on by default: off here for speed, on in the test that compares both
    fields = {"per_device_train_batch_size": 2, "gradient_checkpointing": False, **overrides}
    return SFTConfig(**trainer_fields(folder, **fields))


def test_trl_default_gradient_checkpointing_trains_the_same_adapter(smol_tokenizer, tmp_path):
    adapters = []
    for checkpointing in (True, False):
        model = comoe_model(len(smol_tokenizer))
        args = config(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, max_steps=2)
        trainer = ComoeSFTTrainer(
            model=model, args=args, train_dataset=PROMPT_COMPLETION, processing_class=smol_tokenizer
        )
        trainer.train()
        assert all(row["contrastive"] > 0 for row in trainer.state.log_history if "loss" in row)
        adapters.append({k: v.detach().clone() for k, v in model.adapter_state_dict().items()})
    for name, tensor in adapters[1].items():
        torch.testing.assert_close(adapters[0][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("data", [PROMPT_COMPLETION, MESSAGES], ids=["prompt-completion", "messages"])
def test_sft_trainer_adds_the_auxiliary_losses_and_saves_adapter_folders(smol_tokenizer, tmp_path, data):
    model = comoe_model(len(smol_tokenizer))
    trainer = ComoeSFTTrainer(
        model=model, args=config(tmp_path), train_dataset=data, processing_class=smol_tokenizer
    )
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(row["contrastive"] > 0 for row in rows)
    for row in rows:  # the carried auxiliary loss is in the logged loss, the task loss logged apart
        total = row["task"] + model.comoe_config.contrastive_weight * row["contrastive"]
        assert row["task"] > 0 and row["loss"] == pytest.approx(total, rel=1e-3)
    folder = tmp_path / "checkpoint-2"
    assert (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()

    assert_auxiliary_gradient(trainer, model)


@pytest.mark.parametrize("data", [PROMPT_COMPLETION, MESSAGES], ids=["prompt-completion", "messages"])
def test_plain_sft_trainer_trains_with_the_auxiliary_gradient(smol_tokenizer, tmp_path, data):
    """SFTTrainer's fused head never calls the model's forward: the backbone's output carries the
    auxiliary gradient, so the plain trainer includes it too."""
    model = comoe_model(len(smol_tokenizer))
    trainer = SFTTrainer(
        model=model, args=config(tmp_path, max_steps=2), train_dataset=data, processing_class=smol_tokenizer
    )
    trainer.train()
    assert model.last_aux_losses()["contrastive"] > 0
    assert_auxiliary_gradient(trainer, model)


def test_sft_accumulating_two_copies_of_a_batch_takes_its_step(smol_tokenizer, tmp_path):
    """Gradient accumulation keeps the auxiliary losses' weight: two accumulated copies of a batch move the
    adapter exactly as that batch alone (SGD, so the step is proportional to the gradient)."""
    rows = Dataset.from_dict({"prompt": ["What is 2+2?"] * 4, "completion": [" 4"] * 4})
    adapters = []
    for accumulate in (1, 2):
        model = comoe_model(len(smol_tokenizer))
        args = config(
            tmp_path / str(accumulate), max_steps=1, gradient_accumulation_steps=accumulate, optim="sgd"
        )
        ComoeSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=smol_tokenizer).train()
        adapters.append({k: v.detach().clone() for k, v in model.adapter_state_dict().items()})
    for name, tensor in adapters[1].items():
        torch.testing.assert_close(adapters[0][name], tensor, rtol=1e-4, atol=1e-7, msg=name)


def test_sft_resume_gives_the_uninterrupted_adapter(smol_tokenizer, tmp_path):
    whole = comoe_model(len(smol_tokenizer))
    ComoeSFTTrainer(
        model=whole,
        args=config(tmp_path / "a"),
        train_dataset=PROMPT_COMPLETION,
        processing_class=smol_tokenizer,
    ).train()
    resumed = comoe_model(len(smol_tokenizer), seed=1)
    ComoeSFTTrainer(
        model=resumed,
        args=config(tmp_path / "a"),
        train_dataset=PROMPT_COMPLETION,
        processing_class=smol_tokenizer,
    ).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    expected, got = whole.adapter_state_dict(), resumed.adapter_state_dict()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name


def test_sft_trainer_trains_a_hydralora_adapter_with_the_router_z_loss(smol_tokenizer, tmp_path):
    base = tiny_llama(vocab=len(smol_tokenizer))
    torch.manual_seed(0)
    model = get_comoe_model(base, ComoeConfig.preset("hydralora", aux_objectives={"router_z": 0.001}))
    trainer = ComoeSFTTrainer(
        model=model, args=config(tmp_path), train_dataset=PROMPT_COMPLETION, processing_class=smol_tokenizer
    )
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(row["router_z"] > 0 and row["task"] > 0 for row in rows)
    folder = tmp_path / "checkpoint-2"
    assert json.loads((folder / CONFIG_NAME).read_text())["expert_bank"] == "hydra"
    loaded = ComoeModel.from_pretrained(tiny_llama(vocab=len(smol_tokenizer)), folder)
    assert len(loaded.comoe_layers()) == 6 and loaded.comoe_config.expert_bank == "hydra"  # gate/up/down x 2


def test_sft_trainer_trains_the_dora_baseline(smol_tokenizer, tmp_path):
    model = DORA.build(tiny_llama(vocab=len(smol_tokenizer)), ComoeConfig.preset("comoe", r=4), False)
    trainer = ComoeSFTTrainer(
        model=model, args=config(tmp_path, max_steps=2), train_dataset=MESSAGES, processing_class=smol_tokenizer
    )
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(row["loss"] > 0 for row in rows)
    saved = json.loads((tmp_path / "checkpoint-2" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["use_dora"]) == ("LORA", True)


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("omoe", dict(r=8)),
        ("mola", dict()),
        ("adamole", dict()),
        ("milora", dict()),
        ("comoe-dora", dict(r=4)),
        ("mixlora-ffn", dict()),
    ],
    ids=["omoe", "mola", "adamole", "milora", "comoe-dora", "mixlora-ffn"],
)
def test_sft_trainer_trains_the_zoos_routed_presets(smol_tokenizer, tmp_path, preset, overrides):
    torch.manual_seed(0)
    model = get_comoe_model(tiny_llama(vocab=len(smol_tokenizer)), ComoeConfig.preset(preset, **overrides))
    before = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    trainer = ComoeSFTTrainer(
        model=model, args=config(tmp_path), train_dataset=MESSAGES, processing_class=smol_tokenizer
    )
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(row["task"] > 0 for row in rows)
    after = model.adapter_state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])]
    folder = tmp_path / "checkpoint-2"
    loaded = ComoeModel.from_pretrained(tiny_llama(vocab=len(smol_tokenizer)), folder)
    assert loaded.comoe_config == model.comoe_config
