"""comoe.adapter.auto: load_adapter applies a folder of either kind (comoe's own, or PEFT's LoRA) to a base
model: the same outputs as the model that was saved, frozen unless trainable, and a clear error when a PEFT
adapter does not fit the base."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from comoe import ComoeConfig, get_comoe_model
from comoe.adapter.auto import load_adapter
from comoe.adapter.folder import AdapterFolder
from comoe.adapter.model import ComoeModel
from tests.helpers import tiny_config, tiny_llama

IDS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def saved_comoe(folder) -> ComoeModel:
    model = get_comoe_model(tiny_llama(), ComoeConfig(r=2, lora_dropout=0.0))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.3)
    model.save_pretrained(folder)
    return model.eval()


def saved_peft(folder, target_modules=("q_proj", "v_proj")) -> PeftModel:
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=list(target_modules), init_lora_weights=False)
    )
    model.save_pretrained(folder)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("given", ["path", "str", "AdapterFolder"])
def test_a_comoe_folder_gives_the_saved_models_outputs_frozen(tmp_path, given):
    original = saved_comoe(tmp_path)
    source = {"path": tmp_path, "str": str(tmp_path), "AdapterFolder": AdapterFolder.read(tmp_path)}[given]
    loaded = load_adapter(tiny_llama(), source)
    assert isinstance(loaded, ComoeModel) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(logits(loaded), logits(original))
    assert not torch.equal(logits(loaded), logits(tiny_llama()))  # the experts do contribute


def test_a_trainable_comoe_load_trains_the_experts_only(tmp_path):
    saved_comoe(tmp_path)
    loaded = load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in name or "router" in name) for name in trainable)
    assert loaded.training


def test_a_peft_folder_loads_as_peft_with_the_saved_outputs(tmp_path):
    original = saved_peft(tmp_path)
    loaded = load_adapter(tiny_llama(), tmp_path)
    assert isinstance(loaded, PeftModel) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded), logits(original))
    trainable = load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if "lora_" in n
    }


def test_a_peft_adapter_for_another_shape_is_a_one_line_value_error(tmp_path):
    saved_peft(tmp_path)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(tiny_config(hidden_size=96, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError) as info:
        load_adapter(wider, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: this PEFT adapter does not fit the base model (")
    assert "mismatch" in message and "\n" not in message


def test_a_folder_without_an_adapter_config_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter config here"):
        load_adapter(tiny_llama(), tmp_path)
