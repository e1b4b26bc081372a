"""Saving and loading through the facade: a round trip gives the same logits, the folder's config has
exactly the keys of format version 1 for default settings, and a mis-fitting file is refused before any
expert is allocated."""

import json

import pytest
import torch

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.folder import AdapterFolder
from tests.helpers import tiny_llama

VERSION_1_KEYS = {
    "adapter_type",
    "format_version",
    "base_model_name_or_path",
    "comoe_version",
    "num_experts",
    "top_k",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "layers_to_transform",
    "routing",
    "balance_weight",
    "balance_scope",
    "contrastive",
    "contrastive_weight",
    "temperature",
    "anchor",
    "num_negatives",
    "contrastive_norm_floor",
    "contrastive_max_tokens",
    "adapter_dtype",
    "modules_to_save",
    "expert_compute",
}


def trained(config):
    model = get_comoe_model(tiny_llama(), config)
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.2)
    return model.eval()


def test_round_trip_from_a_path_and_from_a_folder_read_once(tmp_path):
    model = trained(ComoeConfig.preset("comoe", r=4))
    model.save_pretrained(tmp_path)
    assert set(json.loads((tmp_path / "adapter_config.json").read_text())) == VERSION_1_KEYS
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        for source in (tmp_path, AdapterFolder.read(tmp_path)):
            loaded = ComoeModel.from_pretrained(tiny_llama(), source)
            assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
            torch.testing.assert_close(loaded(ids).logits, expected)
    assert (
        ComoeModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True).get_nb_trainable_parameters()[0]
        > 0
    )


def test_a_file_of_another_shape_is_refused_naming_the_tensors(tmp_path):
    trained(ComoeConfig.preset("comoe", r=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match="does not fit the adapter its config describes on this base model \\(shape mismatch: .*lora_A: saved \\(4, 4, 64\\), model \\(4, 8, 64\\)",
    ):
        ComoeModel.from_pretrained(tiny_llama(), tmp_path)


def test_safe_serialization_off_is_refused(tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        trained(ComoeConfig.preset("moe", r=4)).save_pretrained(tmp_path, safe_serialization=False)


def test_top_1_folders_keep_the_gates_they_were_trained_with(tmp_path):
    """Top-1 gates were always renormalised (to 1) before norm_topk_prob existed: a folder without the
    field reads so; a new top-1 folder records that its gate is the router's probability."""
    model = trained(ComoeConfig(num_experts=4, top_k=1, r=4))
    model.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert saved["norm_topk_prob"] is None
    assert not ComoeModel.from_pretrained(tiny_llama(), tmp_path / "new").comoe_config.normalize_gates
    del saved["norm_topk_prob"]  # as written before the field
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(saved))
    (tmp_path / "old" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "new" / "adapter_model.safetensors").read_bytes()
    )
    old = ComoeModel.from_pretrained(tiny_llama(), tmp_path / "old")
    assert old.comoe_config.norm_topk_prob is True
    assert all(layer.normalize_gates for layer in old.comoe_layers().values())
