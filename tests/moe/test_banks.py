"""The expert-bank seam: LoRA experts against a per-expert loop, and a toy variant (HydraLoRA's one shared
A with n B heads) registered from this test alone -- built, trained, counted, saved and loaded without
editing any other module."""

import json
import math

import pytest
import torch
from torch import nn

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.injection import adapter_shapes
from comoe.adapter.lora import comoe_trainable_parameters
from comoe.adapter.targeting import find_target_linears
from comoe.moe.banks import BANKS, ExpertBank, LoraExperts, get_bank, register_bank, unregister_bank
from tests.helpers import tiny_llama


class SharedDownProjection(ExpertBank):
    """HydraLoRA-style: one A [r, d_in] shared by every expert, n B heads [n, r, d_out]."""

    name = "shared_a"

    @classmethod
    def shapes(cls, num_experts, r, in_features, out_features):
        return {"lora_A": (r, in_features), "lora_B": (num_experts, r, out_features)}

    @classmethod
    def reset_parameters(cls, layer):
        with torch.no_grad():
            nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
            layer.lora_B.zero_()

    @classmethod
    def down_project(cls, layer, x):
        return (x @ layer.lora_A.t()).unsqueeze(1).expand(-1, layer.num_experts, -1)

    @classmethod
    def up_weight(cls, layer):
        return layer.lora_B


@pytest.fixture
def shared_bank():
    register_bank(SharedDownProjection)
    yield SharedDownProjection
    unregister_bank("shared_a")


def test_lora_experts_down_project_as_a_loop_over_experts():
    layer = nn.Module()
    layer.in_features, layer.out_features = 12, 7
    LoraExperts.create(layer, 3, 4, dict(dtype=torch.float64))
    x = torch.randn(5, 12, dtype=torch.float64)
    z = LoraExperts.down_project(layer, x)
    for i in range(3):
        torch.testing.assert_close(z[:, i], x @ layer.lora_A[i].t())
    assert torch.equal(LoraExperts.up_weight(layer), torch.zeros(3, 4, 7, dtype=torch.float64))
    assert LoraExperts.num_parameters(3, 4, 12, 7) == 3 * 4 * (12 + 7)


def test_a_registered_bank_is_built_trained_counted_saved_and_loaded(shared_bank, tmp_path):
    config = ComoeConfig.preset("comoe", r=4, lora_dropout=0.0, expert_bank="shared_a")
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_at_init = base(ids).logits
    model = get_comoe_model(base, config)
    layer = next(iter(model.comoe_layers().values()))
    assert layer.lora_A.shape == (4, layer.in_features) and layer.lora_B.shape == (4, 4, layer.out_features)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected_at_init)  # B = 0: the base model exactly
    # counted: the bank's shapes plus the routers, for every adapted linear
    targets = find_target_linears(tiny_llama(), config)
    per_layer = [comoe_trainable_parameters(config, m.in_features, m.out_features) for m in targets.values()]
    assert model.get_nb_trainable_parameters()[0] == sum(per_layer)
    assert per_layer[0] == 4 * 64 + 4 * 4 * 64 + 4 * 64  # shared A, 4 B heads (q: 64 -> 64), router
    assert adapter_shapes(targets, config) == {k: tuple(v.shape) for k, v in model.adapter_state_dict().items()}
    # trained: both the shared A and the heads move, through the contrastive objective too
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.last_aux_losses()["contrastive"] > 0
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    assert not torch.allclose(trained, expected_at_init)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["expert_bank"] == "shared_a"
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained)


def test_unknown_banks_are_refused_and_the_default_is_not_written(tmp_path):
    assert "lora" in BANKS and get_bank("lora") is LoraExperts
    with pytest.raises(ValueError, match="expert_bank='hydra' is not a registered expert bank; valid: lora"):
        get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", expert_bank="hydra"))
    with pytest.raises(ValueError, match="expert_bank='a b'"):
        ComoeConfig(expert_bank="a b")
    get_comoe_model(tiny_llama(), ComoeConfig.preset("moe")).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "expert_bank" not in saved and "aux_objectives" not in saved  # the folder format as before
