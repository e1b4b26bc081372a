"""comoe.adapter.targeting: PEFT's matching rule (name suffixes vs one regex over the path), block indices
and layers_to_transform, the defaults resolved per family, and the errors when targets select nothing or the
wrong kind of module."""

import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from comoe import ComoeConfig, get_comoe_model
from comoe.adapter.targeting import (
    adaptable_names,
    block_count,
    find_target_linears,
    fused_experts,
    is_target,
    layer_configs,
    layer_index,
    matches,
    resolve_targets,
    set_submodule,
)
from comoe.config import ATTENTION_MODULES
from tests.helpers import tiny_llama


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.3.self_attn.q_proj", 3),
        ("transformer.h.12.attn.c_attn", 12),
        ("model.layers.0.mlp.experts.7.w1", 0),  # the block, not the expert
        ("lm_head", None),
        ("model.norm", None),
        ("7.linear", 7),
        ("layer3.q_proj", None),  # digits inside a name are no index
    ],
)
def test_layer_index_is_the_first_numeric_path_component(name, index):
    assert layer_index(name) == index


@pytest.mark.parametrize(
    ("name", "targets", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
        ("q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),  # a longer suffix
        ("model.layers.0.self_attn.xq_proj", ["q_proj"], False),  # suffix of whole components only
        ("model.layers.0.self_attn.q_proj.weight", ["q_proj"], False),
        ("model.layers.0.self_attn.q_proj", ["k_proj", "v_proj"], False),
        ("model.layers.0.self_attn.q_proj", r".*\.q_proj", True),  # one string: a regex
        ("model.layers.0.self_attn.q_proj", r"q_proj", False),  # over the whole path
        ("model.layers.1.self_attn.v_proj", r".*layers\.[01]\.self_attn\.(q|v)_proj", True),
        ("model.layers.2.self_attn.v_proj", r".*layers\.[01]\.self_attn\.(q|v)_proj", False),
    ],
)
def test_matches_follows_peft_suffix_and_regex_rules(name, targets, expected):
    assert matches(name, targets) is expected


def test_is_target_applies_layers_to_transform():
    config = ComoeConfig(target_modules=["q_proj"], layers_to_transform=[1, 3])
    assert is_target("model.layers.1.self_attn.q_proj", config)
    assert not is_target("model.layers.2.self_attn.q_proj", config)
    assert not is_target("model.layers.1.self_attn.k_proj", config)
    assert not is_target("q_proj", config)  # no block index: outside every listed block
    assert is_target("q_proj", ComoeConfig(target_modules=["q_proj"]))


def test_find_target_linears_on_a_llama():
    model = tiny_llama()
    found = find_target_linears(model, ComoeConfig())
    assert sorted(found) == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ATTENTION_MODULES
    )
    assert all(found[name] is model.get_submodule(name) for name in found)
    only = find_target_linears(
        model, ComoeConfig(target_modules=["up_proj", "down_proj"], layers_to_transform=[1])
    )
    assert sorted(only) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    regex = find_target_linears(model, ComoeConfig(target_modules=r"model\.layers\.0\..*_proj"))
    assert len(regex) == 7  # four attention and three MLP projections of block 0


def test_no_match_lists_the_linear_layers_and_close_names():
    with pytest.raises(ValueError) as info:
        find_target_linears(tiny_llama(), ComoeConfig(target_modules=["q_projj", "c_attn"]))
    message = str(info.value)
    assert message.startswith(
        "target_modules=['q_projj', 'c_attn'] matches no nn.Linear or Conv1D in the model"
    )
    assert "close matches: ['q_proj']" in message
    assert message.endswith(
        "the model's linear layers are named ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', "
        "'up_proj', 'v_proj']"
    )
    with pytest.raises(ValueError, match=r"\(with layers_to_transform=\[5\]\)"):
        find_target_linears(tiny_llama(), ComoeConfig(layers_to_transform=[5]))


def test_a_target_that_is_not_a_linear_is_refused():
    with pytest.raises(
        ValueError,
        match=r"^target_modules: 'model.layers.0.self_attn' is a LlamaAttention; comoe adapts nn.Linear",
    ):
        find_target_linears(tiny_llama(), ComoeConfig(target_modules=["self_attn"]))


def test_a_model_is_adapted_once():
    model = get_comoe_model(tiny_llama(), ComoeConfig(r=2))
    with pytest.raises(ValueError, match="is already a comoe layer; apply comoe to a model only once"):
        find_target_linears(model.wrapped_model, ComoeConfig(r=2))
    with pytest.raises(ValueError, match="^model: comoe has already been applied to this model"):
        find_target_linears(model.wrapped_model, ComoeConfig(target_modules=["gate_proj"]))


def test_resolve_targets_keeps_what_matches_and_warns_about_explicit_targets_that_do_not():
    model = tiny_llama()
    config = ComoeConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_targets(model, config) is config  # every default name exists
        regex = ComoeConfig(target_modules=r"nothing")
        assert resolve_targets(model, regex) is regex  # a regex is taken as given
    partial = ComoeConfig(target_modules=["q_proj", "qkv"])
    with pytest.warns(
        UserWarning,
        match=r"target_modules: \['qkv'\] match nothing in this LlamaForCausalLM.*adapting \['q_proj'\]\); PEFT's default for llama is",
    ):
        assert resolve_targets(model, partial) is partial


def test_on_gpt2_the_default_targets_resolve_to_its_fused_projection():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    resolved = resolve_targets(gpt2, ComoeConfig())
    assert resolved.target_modules == ["c_attn"]
    assert sorted(find_target_linears(gpt2, resolved)) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]
    assert adaptable_names(gpt2) == ["c_attn", "c_fc", "c_proj", "lm_head"]


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(4, 8, 6))
        self.down_proj = nn.Parameter(torch.zeros(4, 3, 8))


class ToyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"experts": Experts(), "q_proj": nn.Linear(8, 8)})])


def test_fused_expert_parameters_are_listed_and_named_when_targeted():
    model = ToyMoE()
    assert fused_experts(model) == [
        "layers.0.experts.gate_up_proj [4, 8, 6]",
        "layers.0.experts.down_proj [4, 3, 8]",
    ]
    with pytest.warns(UserWarning, match="routed experts are fused 3-D parameters"):
        assert list(find_target_linears(model, ComoeConfig(target_modules=["q_proj"]))) == ["layers.0.q_proj"]
    with pytest.raises(ValueError, match=r"'layers.0.experts' is a Experts holding fused expert parameters"):
        find_target_linears(model, ComoeConfig(target_modules=["experts"]))


def test_set_submodule_replaces_a_nested_or_top_level_module():
    model = tiny_llama()
    replacement = nn.Identity()
    set_submodule(model, "model.layers.1.self_attn.q_proj", replacement)
    assert model.model.layers[1].self_attn.q_proj is replacement
    root = nn.Sequential(nn.Linear(2, 2))
    set_submodule(root, "0", replacement)
    assert root[0] is replacement


def test_block_count_and_each_linears_config_by_depth():
    model = tiny_llama()
    assert block_count(model) == 2 and block_count(nn.Linear(2, 2)) == 0
    config = ComoeConfig(num_experts=8, experts_by_depth=[2, 4, 6, 8])
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "lm_head"]
    configs = layer_configs(model, config, names)
    assert [configs[n].num_experts for n in names] == [2, 6, 8]  # 2 blocks in 4 groups; lm_head outside
    assert all(c.experts_by_depth is None for c in configs.values())
    plain = ComoeConfig()
    assert all(c is plain for c in layer_configs(model, plain, names).values())
