"""comoe.models.auto: AutoComoeModelForCausalLM loads the base model an adapter folder names and applies
the adapter: the same logits as ComoeModel.from_pretrained on that base, frozen unless trainable; a moved
base is given by hand; the folder is checked before any model is loaded."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from comoe.adapter.model import ComoeModel
from comoe.adapter.serialization import CONFIG_NAME
from comoe.models import auto
from comoe.models.auto import AutoComoeModelForCausalLM
from comoe.models.loading import load_base
from tests.helpers import adapted

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_auto_model_loads_base_and_adapter_from_the_folder_alone(tiny_model_dir, tmp_path):
    model = adapted(tiny_model_dir)
    model.save_pretrained(tmp_path)
    loaded = AutoComoeModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not any(p.requires_grad for p in loaded.parameters())
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not record its base model"):
        AutoComoeModelForCausalLM.from_pretrained(tmp_path)
    assert AutoComoeModelForCausalLM.from_pretrained(tmp_path, base_model=str(tiny_model_dir)) is not None


def test_the_same_logits_as_comoe_model_from_pretrained_on_the_recorded_base(tiny_model_dir, tmp_path):
    adapted(tiny_model_dir).save_pretrained(tmp_path)
    loaded = AutoComoeModelForCausalLM.from_pretrained(str(tmp_path))
    by_hand = ComoeModel.from_pretrained(load_base(str(tiny_model_dir))[0], tmp_path)
    assert isinstance(loaded, ComoeModel) and not loaded.training
    assert torch.equal(logits(loaded), logits(by_hand))
    assert loaded.comoe_config == by_hand.comoe_config


def test_a_moved_base_is_given_by_hand_and_trainable_loads_train_the_experts(tiny_model_dir, tmp_path):
    moved = tmp_path / "moved-base"
    shutil.copytree(tiny_model_dir, moved)
    model = adapted(moved)
    model.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        AutoComoeModelForCausalLM.from_pretrained(tmp_path / "adapter")
    loaded = AutoComoeModelForCausalLM.from_pretrained(
        tmp_path / "adapter", base_model=str(tiny_model_dir), is_trainable=True
    )
    trainable = [name for name, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "router" in name for name in trainable)
    loaded.eval()
    assert torch.equal(logits(loaded), logits(model))


def test_a_peft_folder_loads_its_recorded_base_too(tiny_model_dir, tmp_path):
    base, _ = load_base(str(tiny_model_dir))
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    loaded = AutoComoeModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, PeftModel)
    torch.testing.assert_close(logits(loaded), logits(peft.eval()))


def test_a_broken_folder_fails_before_the_base_model_is_loaded(tmp_path, monkeypatch):
    def no_loading(name):
        raise AssertionError(f"load_base({name!r}) called")

    monkeypatch.setattr(auto, "load_base", no_loading)
    (tmp_path / CONFIG_NAME).write_text("{")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        AutoComoeModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter config here"):
        AutoComoeModelForCausalLM.from_pretrained(tmp_path / "missing")
