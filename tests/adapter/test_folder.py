"""What an adapter folder records and who can read it: the base model's name and comoe's version, a model
card, transformers' save_pretrained keywords, AutoComoeModelForCausalLM, and push_to_hub."""

import json
import shutil

import pytest
import torch

from comoe.adapter.model import get_comoe_model
from comoe.adapter.serialization import CONFIG_NAME, WEIGHTS_NAME, load_config, read_safetensors
from comoe.config import ComoeConfig
from comoe.models.auto import AutoComoeModelForCausalLM
from comoe.models.loading import load_base


def adapted(folder):
    base, _ = load_base(str(folder))
    model = get_comoe_model(base, ComoeConfig.preset("comoe", r=4, lora_dropout=0.0))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.2)
    return model.eval()


def test_folder_records_base_model_version_and_a_model_card(tiny_model_dir, tmp_path):
    model = adapted(tiny_model_dir)
    model.card_notes["training data"] = "chain_sum, syllogism (built-in)"
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert config["comoe_version"] not in ("", None)
    assert load_config(tmp_path) == model.comoe_config  # provenance keys are not settings
    card = (tmp_path / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card
    assert "CoMoE (arXiv 2505.17553)" in card and "4 LoRA experts of rank 4" in card
    assert "**training data:** chain_sum, syllogism (built-in)" in card


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


def test_save_pretrained_takes_the_keywords_transformers_passes(tiny_model_dir, tmp_path):
    model = adapted(tiny_model_dir)
    whole = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # as Trainer gathers it
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.zero_()  # the live weights differ: the given state dict must be what is written
    model.save_pretrained(tmp_path, state_dict=whole, safe_serialization=True, max_shard_size="5GB")
    written = read_safetensors(tmp_path / WEIGHTS_NAME)
    for name, tensor in written.items():
        assert torch.equal(tensor, whole[f"wrapped_model.{name}"])
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)


class StandInHub:
    """The two HfApi calls push_to_hub makes, recorded; uploads copied into a local folder."""

    calls: list = []
    store = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        StandInHub.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message, repo_type=None):
        StandInHub.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, StandInHub.store / repo_id.replace("/", "--"))
        return f"https://hub.example/{repo_id}/commit/1"


def test_push_to_hub_uploads_the_adapter_folder_only(tiny_model_dir, tmp_path, monkeypatch):
    StandInHub.calls, StandInHub.store = [], tmp_path
    monkeypatch.setattr("comoe.adapter.model.HfApi", StandInHub)
    model = adapted(tiny_model_dir)
    url = model.push_to_hub("me/tiny-comoe", private=True)
    assert url.endswith("/commit/1")
    assert StandInHub.calls[0] == ("create_repo", "me/tiny-comoe", True, True)
    uploaded = sorted(p.name for p in (tmp_path / "me--tiny-comoe").iterdir())
    assert uploaded == ["README.md", CONFIG_NAME, WEIGHTS_NAME]  # no base model weights
    assert (
        read_safetensors(tmp_path / "me--tiny-comoe" / WEIGHTS_NAME).keys()
        == model.adapter_state_dict().keys()
    )
