"""The adapter folder format: folders written by earlier releases load, and folder kinds are told apart."""

import json

import pytest
import torch
from safetensors.torch import save_file

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.serialization import adapter_kind, check_fits
from comoe.errors import AdapterMismatch
from tests.helpers import tiny_llama

# adapter_config.json exactly as format version 1 has been written since the first release.
V1_CONFIG = {
    "adapter_type": "comoe",
    "format_version": 1,
    "num_experts": 2,
    "top_k": 2,
    "r": 2,
    "lora_alpha": 4.0,
    "lora_dropout": 0.0,
    "target_modules": ["v_proj"],
    "layers_to_transform": None,
    "routing": "topk",
    "balance_weight": 0.0,
    "balance_scope": "local",
    "contrastive": "comoe",
    "contrastive_weight": 0.01,
    "temperature": 0.5,
    "anchor": "all",
    "num_negatives": None,
    "contrastive_max_tokens": 128,
    "expert_compute": "auto",
}


def test_a_version_1_folder_written_by_hand_loads_with_its_weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for block in (0, 1):
        prefix = f"model.layers.{block}.self_attn.v_proj"
        tensors[f"{prefix}.lora_A"] = torch.randn(2, 2, 64, generator=g)
        tensors[f"{prefix}.lora_B"] = torch.randn(2, 2, 32, generator=g)
        tensors[f"{prefix}.router.weight"] = torch.randn(2, 64, generator=g)
    (tmp_path / "adapter_config.json").write_text(json.dumps(V1_CONFIG))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert adapter_kind(tmp_path) == "comoe"
    model = ComoeModel.from_pretrained(tiny_llama(), tmp_path)
    layer = model.comoe_layers()["model.layers.1.self_attn.v_proj"]
    assert torch.equal(layer.lora_B, tensors["model.layers.1.self_attn.v_proj.lora_B"])
    assert torch.equal(layer.router.weight, tensors["model.layers.1.self_attn.v_proj.router.weight"])
    assert not any(p.requires_grad for p in model.parameters())


def test_adapter_kind_tells_peft_from_comoe_and_checks_both_files(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: adapter weights not found"):
        adapter_kind(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert adapter_kind(tmp_path) == "peft"
    (tmp_path / "adapter_config.json").write_text(json.dumps({**V1_CONFIG, "top_k": 3}))
    with pytest.raises(ValueError, match="adapter_config.json: top_k=3 is invalid"):
        adapter_kind(tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter config here"):
        adapter_kind(tmp_path / "missing")


def test_non_finite_adapter_config_values_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({**V1_CONFIG, "lora_alpha": float("inf")}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(
        ValueError, match="adapter_config.json: lora_alpha=inf is invalid: expected a finite number"
    ):
        adapter_kind(tmp_path)


def test_shapes_are_checked_before_any_expert_is_allocated(tmp_path, monkeypatch):
    """Finding 6: num_experts = 10**9 in the config must fail from the file's header, not in an allocation."""
    save_file(
        {"model.layers.0.self_attn.v_proj.lora_A": torch.zeros(2, 2, 64)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({**V1_CONFIG, "num_experts": 10**9, "top_k": 2}))

    def no_allocation(*args, **kwargs):
        raise AssertionError("an expert was allocated before the shapes were checked")

    monkeypatch.setattr("comoe.adapter.model.ComoeLinear", no_allocation)
    with pytest.raises(
        ValueError,
        match=r"shape mismatch: model.layers.0.self_attn.v_proj.lora_A: saved \(2, 2, 64\), model \(1000000000, 2, 64\)",
    ):
        ComoeModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_config_that_disagrees_with_its_weights_is_one_short_line_naming_the_config(tmp_path):
    # a LoRA-bank adapter whose adapter_config.json was edited to the DoRA bank: the file has no magnitudes
    get_comoe_model(tiny_llama(), ComoeConfig(num_experts=2, top_k=1, r=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "expert_bank": "dora"}))
    with pytest.raises(AdapterMismatch) as raised:
        ComoeModel.from_pretrained(tiny_llama(), tmp_path)
    message, differences = str(raised.value), raised.value.differences
    magnitudes = [d for d in differences if d.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == len(differences) > 3  # one per adapted linear, every one listed
    first = ", ".join(d.removeprefix("missing in file ") for d in differences[:3])
    assert (
        f"(missing in file: {len(differences)} x lora_magnitude_vector: {first}, and {len(differences) - 3} "
        "more): the config's method fields (expert_bank, " in message
    )
    assert message.startswith(f"{tmp_path / 'adapter_model.safetensors'} does not fit the adapter its config")
    assert "\n" not in message and len(message.removeprefix(str(tmp_path))) < 500  # was 1,600 characters, cut mid-list


def test_check_fits_lists_a_few_of_each_kind_of_difference():
    expected = {"a.lora_A": (2, 4), "b.lora_A": (2, 4), "c.lora_B": (4, 2)}
    saved = {"a.lora_A": (2, 8), "b.lora_A": (2, 4), "d.lora_B": (4, 2)}
    with pytest.raises(AdapterMismatch) as raised:
        check_fits(expected, saved, "w.safetensors")
    assert str(raised.value).startswith(
        "w.safetensors does not fit the adapter its config describes on this base model (missing in file: "
        "c.lora_B; not in model: d.lora_B; shape mismatch: a.lora_A: saved (2, 8), model (2, 4)): "
    )
    assert raised.value.differences == [
        "missing in file c.lora_B",
        "not in model d.lora_B",
        "shape mismatch a.lora_A: saved (2, 8), model (2, 4)",
    ]
