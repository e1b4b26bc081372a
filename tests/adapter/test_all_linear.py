"""target_modules="all-linear", PEFT's shorthand: every nn.Linear / Conv1D except the output head, resolved
to a concrete list that the adapter folder records (so a reload adapts the same layers) and that the matched
PEFT LoRA baseline targets too. Checked against PEFT's own resolution of the shorthand."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.lora import matched_lora_config
from comoe.adapter.targeting import all_linear_targets, find_target_linears, resolve_targets
from tests.helpers import tiny_llama

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def peft_all_linear(model: nn.Module) -> set[str]:
    """The module paths PEFT's LoRA adapts for target_modules="all-linear"."""
    config = _maybe_include_all_linear_layers(
        LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM"), model
    )
    return set(config.target_modules)


def adapted(model: ComoeModel) -> set[str]:
    return set(model.comoe_layers())


def test_all_linear_on_a_llama_adapts_every_projection_of_every_block_and_not_the_head():
    model = get_comoe_model(tiny_llama(), ComoeConfig(target_modules="all-linear", r=2, num_experts=2))
    expected = {
        f"model.layers.{i}.{part}.{name}"
        for i in range(2)
        for name in LLAMA_LINEARS
        for part in (["self_attn"] if name in LLAMA_LINEARS[:4] else ["mlp"])
    }
    assert adapted(model) == expected == peft_all_linear(tiny_llama())
    assert not any("lm_head" in name for name in adapted(model))
    assert model.comoe_config.target_modules == sorted(LLAMA_LINEARS)  # what the adapter folder records


def test_all_linear_on_gpt2_adapts_its_conv1d_layers_and_not_the_head():
    model = get_comoe_model(
        tiny_gpt2(), ComoeConfig(target_modules="ALL-LINEAR", r=2, num_experts=2)
    )  # any case
    expected = {
        f"transformer.h.{i}.{name}"
        for i in range(2)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert adapted(model) == expected == peft_all_linear(tiny_gpt2())
    assert model.comoe_config.target_modules == ["c_attn", "c_fc", "c_proj"]


def test_all_linear_with_layers_to_transform_adapts_those_blocks_only():
    config = ComoeConfig(target_modules="all-linear", layers_to_transform=[1], r=2, num_experts=2)
    model = get_comoe_model(tiny_llama(), config)
    assert len(adapted(model)) == 7 and all(name.startswith("model.layers.1.") for name in adapted(model))


def test_an_all_linear_adapter_saves_the_concrete_list_and_reloads_the_same_layers(tmp_path):
    torch.manual_seed(0)
    model = get_comoe_model(
        tiny_llama(), ComoeConfig(target_modules="all-linear", r=2, num_experts=2, lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(LLAMA_LINEARS)
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert adapted(loaded) == adapted(model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_the_matched_lora_baseline_targets_the_same_modules(build):
    config = ComoeConfig(target_modules="all-linear", r=2, num_experts=2)
    comoe_layers = adapted(get_comoe_model(build(), config))
    lora = matched_lora_config(config, build())
    assert sorted(lora.target_modules) == resolve_targets(build(), config).target_modules
    peft_model = get_peft_model(build(), lora)
    lora_layers = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and name.split(".")[-1] not in ("lora_A", "lora_B")
    }
    assert lora_layers == comoe_layers


class Shadowed(nn.Module):
    """A name shared by a linear and a non-linear module, and by the output head and a linear."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4), "out": nn.Linear(4, 4)})
        self.other = nn.ModuleDict({"norm": nn.Linear(4, 4)})  # 'norm' names a LayerNorm elsewhere
        self.head = nn.ModuleDict({"out": nn.Linear(4, 8)})  # 'out' names the output head too

    def get_output_embeddings(self):
        return self.head["out"]


def test_names_that_also_name_other_modules_are_given_as_full_paths():
    model = Shadowed()
    assert all_linear_targets(model) == ["block.out", "other.norm", "proj"]
    resolved = resolve_targets(model, ComoeConfig(target_modules="all-linear"))
    assert sorted(find_target_linears(model, resolved)) == ["block.out", "block.proj", "other.norm"]


class HeadOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(4, 8)

    def get_output_embeddings(self):
        return self.lm_head


def test_a_model_whose_only_linear_is_its_head_is_refused_by_name():
    with pytest.raises(
        ValueError,
        match=r"^target_modules='all-linear': this HeadOnly has no nn.Linear or Conv1D layer besides its output head \['lm_head'\]$",
    ):
        get_comoe_model(HeadOnly(), ComoeConfig(target_modules="all-linear"))
