"""Injection: what becomes a ComoeLinear or a trained copy, shapes known before anything is built, and
ejection giving back the very modules that were replaced; MoLA's expert counts by depth against a model
assembled by hand, block by block."""

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from comoe.adapter.injection import (
    adapter_shapes,
    eject,
    expected_shapes,
    inject,
    modules_to_save,
    saved_shapes,
)
from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.adapter.lora import comoe_trainable_parameters, matched_lora_config
from comoe.adapter.model import ComoeModel, get_comoe_model
from comoe.adapter.targeting import find_target_linears, set_submodule
from comoe.config import ComoeConfig
from tests.helpers import tiny_config, tiny_llama


def test_inject_then_eject_restores_the_original_modules():
    model = tiny_llama()
    originals = dict(model.named_modules())
    injection = inject(model, ComoeConfig.preset("comoe", r=4), ComoeContext())
    assert sorted(injection.layers) == sorted(
        n for n in originals if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
    )
    assert all(isinstance(dict(model.named_modules())[n], ComoeLinear) for n in injection.layers)
    assert not any(
        p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "router" not in n
    )
    assert eject(model, injection) is model
    assert all(dict(model.named_modules())[n] is originals[n] for n in injection.layers)


def test_shapes_are_known_before_building_and_match_what_is_built():
    config = ComoeConfig.preset("moelora", r=4)
    model = tiny_llama()
    shapes = adapter_shapes(find_target_linears(model, config), config)
    assert shapes["model.layers.0.self_attn.k_proj.lora_A"] == (8, 4, 64)
    assert shapes["model.layers.0.self_attn.k_proj.lora_B"] == (8, 4, 32)
    assert shapes["model.layers.0.self_attn.k_proj.router.weight"] == (8, 64)
    assert expected_shapes(tiny_llama(), config) == shapes
    injection = inject(model, config, ComoeContext())
    built = {
        f"{n}.{k}": tuple(getattr(layer, k).shape)
        for n, layer in injection.layers.items()
        for k in ("lora_A", "lora_B")
    }
    built.update(
        {f"{n}.router.weight": tuple(layer.router.weight.shape) for n, layer in injection.layers.items()}
    )
    assert built == shapes


def test_modules_to_save_become_trained_copies_with_their_shapes():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config(num_labels=3, pad_token_id=0))
    config = ComoeConfig.preset("moe", r=4, modules_to_save=["score"])
    found = modules_to_save(model, config)
    assert list(found) == ["score"]
    assert saved_shapes(found) == {"score.trained_module.weight": (3, 64)}
    assert expected_shapes(model, config)["score.trained_module.weight"] == (3, 64)
    injection = inject(model, config, ComoeContext())
    assert injection.saved["score"].trained_module.weight.requires_grad
    with pytest.raises(ValueError, match="modules_to_save: \\['classifier'\\] match no module of this Llama"):
        modules_to_save(model, ComoeConfig.preset("moe", modules_to_save=["classifier"]))


MOLA_BLOCKS = [2, 4, 6, 8]  # MoLA-▽ on a 4-block model: one block per quarter, bottom to top


def test_mola_is_a_plain_moe_lora_per_block_with_that_blocks_expert_count(tmp_path):
    """The preset on a 4-block LLaMA against the same model assembled by hand (each block's linears plain
    ComoeLinear layers of 2, 4, 6, 8 experts): equal logits and gradients; shapes, count, matched LoRA
    rank and the saved folder follow the per-layer counts."""
    config = ComoeConfig.preset("mola", lora_dropout=0.0)
    base = tiny_llama_blocks(4)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        at_init = base(ids).logits
    model = get_comoe_model(base, config)
    layers = model.comoe_layers()
    assert {name: layer.num_experts for name, layer in layers.items()} == {
        name: MOLA_BLOCKS[int(name.split(".")[2])] for name in layers
    }
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, at_init)  # B = 0: the base exactly
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
            layer.router.weight.normal_(0, 1.0)
    # the reference: plain MoE-LoRA layers, each built with its block's count written out
    reference, context = tiny_llama_blocks(4), ComoeContext()
    for param in reference.parameters():
        param.requires_grad_(False)
    for name, layer in layers.items():
        count = MOLA_BLOCKS[int(name.split(".")[2])]
        plain = ComoeConfig.preset("moe", num_experts=count, r=8, lora_alpha=16.0, lora_dropout=0.0)
        built = ComoeLinear(reference.get_submodule(name), plain, context)
        with torch.no_grad():
            built.lora_A.copy_(layer.lora_A)
            built.lora_B.copy_(layer.lora_B)
            built.router.weight.copy_(layer.router.weight)
        set_submodule(reference, name, built)
    out, expected = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(out, expected)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), [p for _, p in sorted(model.adapter_state_dict().items())])
    mine = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    want = torch.autograd.grad((expected * weights).sum(), [mine[n] for n in sorted(model.adapter_state_dict())])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    # shapes known before building, the count and the matched LoRA baseline per layer
    targets = find_target_linears(tiny_llama_blocks(4), config)
    assert adapter_shapes(targets, config) == {k: tuple(v.shape) for k, v in model.adapter_state_dict().items()}
    assert expected_shapes(tiny_llama_blocks(4), config) == adapter_shapes(targets, config)
    shapes = ((64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64))  # q k v o gate up down
    total = sum(8 * n * (d_in + d_out) + n * d_in for n in MOLA_BLOCKS for d_in, d_out in shapes)
    assert model.get_nb_trainable_parameters()[0] == total
    assert total == sum(
        comoe_trainable_parameters(layer_config, m.in_features, m.out_features)
        for name, m in targets.items()
        for layer_config in [config.at_depth(int(name.split(".")[2]), 4)]
    )
    per_rank = 4 * sum(d_in + d_out for d_in, d_out in shapes)  # a LoRA's parameters per rank, 4 blocks
    assert matched_lora_config(config, tiny_llama_blocks(4)).r == round(total / per_rank)
    # saved and loaded: the folder keeps experts_by_depth and reloads each block's count
    model.save_pretrained(tmp_path / "mola")
    loaded = ComoeModel.from_pretrained(tiny_llama_blocks(4), tmp_path / "mola")
    assert loaded.comoe_config.experts_by_depth == MOLA_BLOCKS
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out.detach())


def tiny_llama_blocks(blocks: int):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=blocks)).eval()
