"""Injection: what becomes a ComoeLinear or a trained copy, shapes known before anything is built, and
ejection giving back the very modules that were replaced."""

import pytest
import torch
from transformers import LlamaForSequenceClassification

from comoe.adapter.injection import (
    adapter_shapes,
    eject,
    expected_shapes,
    inject,
    modules_to_save,
    saved_shapes,
)
from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.adapter.targeting import find_target_linears
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
