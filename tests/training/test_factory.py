"""comoe.training.factory: build_model on a tiny local model folder, for a comoe preset and for the LoRA
baseline at the same trainable-parameter count (within the rounding of its rank), seeded and in the
requested dtype."""

import pytest
import torch
import yaml
from peft import PeftModel

from comoe.adapter.lora import comoe_trainable_parameters
from comoe.adapter.model import ComoeModel
from comoe.settings import load_settings
from comoe.training import factory
from comoe.training.factory import build_model
from comoe.training.settings import TrainArgs
from comoe.validation import InvalidSetting

ADAPTER = {"r": 4, "num_experts": 4}
# The tiny LLaMA's attention projections (hidden 64, 2 of 4 heads for keys and values), in 2 blocks.
SHAPES = [(64, 64), (64, 32), (64, 32), (64, 64)] * 2


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def args(model_dir, **fields) -> TrainArgs:
    return TrainArgs(model=str(model_dir), device="cpu", adapter_config=ADAPTER, **fields)


def test_comoe_and_lora_train_the_same_capacity(tiny_model_dir):
    comoe, tokenizer = build_model(args(tiny_model_dir, preset="comoe"))
    lora, _ = build_model(args(tiny_model_dir, preset="lora"))
    assert isinstance(comoe, ComoeModel) and isinstance(lora, PeftModel)
    config = comoe.comoe_config
    assert (config.num_experts, config.r, config.contrastive) == (4, 4, "comoe")
    expected = sum(comoe_trainable_parameters(config, d_in, d_out) for d_in, d_out in SHAPES)
    comoe_count = sum(p.numel() for p in trainable(comoe).values())
    lora_count = sum(p.numel() for p in trainable(lora).values())
    assert comoe_count == expected
    per_rank = sum(d_in + d_out for d_in, d_out in SHAPES)
    assert lora_count % per_rank == 0 and abs(lora_count - comoe_count) <= per_rank / 2
    assert all("lora_" in name for name in trainable(lora))
    assert tokenizer.pad_token is not None and len(tokenizer) == comoe.get_input_embeddings().num_embeddings


def test_the_adapter_initialisation_follows_the_seed(tiny_model_dir):
    first, _ = build_model(args(tiny_model_dir, seed=5))
    again, _ = build_model(args(tiny_model_dir, seed=5))
    other, _ = build_model(args(tiny_model_dir, seed=6))
    for name, param in trainable(first).items():
        assert torch.equal(param, trainable(again)[name]), name
    assert any(not torch.equal(p, trainable(other)[n]) for n, p in trainable(first).items() if "lora_A" in n)


@pytest.mark.parametrize("preset", ["comoe", "lora"])
def test_the_base_takes_the_dtype_and_the_adapter_stays_float32(tiny_model_dir, preset):
    model, _ = build_model(args(tiny_model_dir, preset=preset, dtype="bfloat16"))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in trainable(model).values()} == {torch.float32}


def test_gradient_checkpointing_is_switched_on_when_asked(tiny_model_dir):
    plain, _ = build_model(args(tiny_model_dir))
    checkpointed, _ = build_model(args(tiny_model_dir, gradient_checkpointing=True))
    assert not plain.wrapped_model.is_activation_checkpointing
    assert checkpointed.wrapped_model.is_activation_checkpointing


def test_a_missing_gpu_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda'"):
        build_model(TrainArgs(model=str(tmp_path / "not-a-model"), device="cuda"))



def test_build_model_checks_the_registered_names_before_the_model_is_loaded(tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(tmp_path / "not-a-model"), "adapter_config": {"routing": "x"}}))
    monkeypatch.setattr(factory, "load_base", lambda *a, **k: pytest.fail("the base model was loaded"))
    with pytest.raises(InvalidSetting, match=f"^{config}: adapter_config: routing='x' is not a registered"):
        build_model(load_settings(TrainArgs, config, {"device": "cpu"}))
