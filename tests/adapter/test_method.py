"""The adapter-method protocol: one answer per operation for a comoe preset and the PEFT LoRA baseline, so
training, checkpointing and integrations never test the model's class."""

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.utils import save_and_load
from safetensors.torch import load_file

from comoe import ComoeConfig
from comoe.adapter.method import COMOE, DORA, LORA, METHODS, method_for, method_of, save_adapter
from tests.helpers import tiny_llama


class Wrapper(torch.nn.Module):
    """What DistributedDataParallel looks like from outside: the model under `module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize(
    "preset",
    [
        *("comoe", "moe", "moelora", "mixlora", "mixlora-ffn", "hydralora", "omoe", "mola", "comoe-dora"),
        *("adamole", "milora", "lora", "dora"),
    ],
)
def test_each_preset_builds_a_model_its_method_owns(preset):
    method = method_for(preset)
    baseline = preset in ("lora", "dora")
    assert method is {"lora": LORA, "dora": DORA}.get(preset, COMOE)
    model = method.build(tiny_llama(), ComoeConfig.preset("comoe" if baseline else preset, r=4), False)
    assert isinstance(model, PeftModel) == baseline
    assert method_of(model) is method and method_of(Wrapper(model)) is method  # DoRA's PEFT model is not LoRA's
    assert method.has_routing == (not baseline)
    # mixlora-ffn: the MLPs, not plain LoRAs; mola: every attention and MLP linear of the two blocks
    routed = {"hydralora": 6, "mixlora-ffn": 2, "mola": 14}.get(preset, 8)
    assert len(method.routed_layers(model)) == (0 if baseline else routed)


def test_auxiliary_losses_are_the_models_or_zero():
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    comoe = COMOE.build(tiny_llama(), ComoeConfig.preset("mixlora", r=4), False).train()
    with COMOE.caller_adds_aux_loss(comoe):
        comoe(input_ids=ids)
    components = COMOE.aux_components(comoe)
    assert set(components) == {"balance", "contrastive"} and components["balance"] > 0.5
    assert float(COMOE.weighted_aux_loss(comoe)) == pytest.approx(0.01 * components["balance"], rel=1e-6)
    lora = LORA.build(tiny_llama(), ComoeConfig.preset("comoe", r=4), False).train()
    with LORA.caller_adds_aux_loss(lora), LORA.record_routing(lora) as records:
        lora(input_ids=ids)
    assert records == {} and float(LORA.weighted_aux_loss(lora)) == 0.0
    assert LORA.aux_components(lora) == {"balance": 0.0, "contrastive": 0.0}
    assert method_of(tiny_llama()) is None
    assert set(METHODS) >= {"comoe", "lora", "dora"}


@pytest.mark.parametrize("method", [COMOE, LORA, DORA])
def test_adapter_state_loads_back_into_a_fresh_model(method):
    config = ComoeConfig.preset("comoe", r=4)
    trained = method.build(tiny_llama(), config, False)
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.normal_(0, 0.1)
    if method is COMOE:
        state = {name: tensor.detach().clone() for name, tensor in trained.adapter_state_dict().items()}
    else:
        state = {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(trained).items()}
    assert any("lora_magnitude_vector" in name for name in state) == (method is DORA)
    fresh = method.build(tiny_llama(), config, False)
    method.load_adapter_state(fresh, state, "checkpoint")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    trained.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained(input_ids=ids).logits)


def no_hub(*args, **kwargs):
    raise AssertionError(f"a Hub lookup while saving: {args}")


@pytest.mark.parametrize("method", [LORA, DORA])
@pytest.mark.parametrize("saved_modules", [None, ["embed_tokens"]])
def test_a_peft_baseline_saves_without_a_hub_lookup(method, saved_modules, tmp_path, monkeypatch):
    """PEFT's save_embedding_layers='auto' asks the Hub whether the base (an alias here) has a config.json
    (offline: "Unable to fetch remote file", "Could not find a config file"); save_adapter never asks, and
    modules_to_save (the embeddings too) are still saved."""
    base = tiny_llama()
    base.name_or_path = base.config._name_or_path = "smollm2-135m"  # no local folder: PEFT asks the Hub
    model = method.build(base, ComoeConfig.preset("comoe", r=4, modules_to_save=saved_modules), False)
    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", no_hub)
    with pytest.raises(AssertionError, match="Hub lookup"):
        model.save_pretrained(tmp_path / "peft-default")  # the lookup this test watches for
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_adapter(model, tmp_path / "adapter")
    assert not [w for w in caught if "config file" in str(w.message) or "remote file" in str(w.message)]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in name for name in saved)
    assert any("embed_tokens" in name for name in saved) == (saved_modules is not None)
