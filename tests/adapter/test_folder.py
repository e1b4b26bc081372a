"""What an adapter folder records and who can read it: the base model's name and comoe's version, a model
card, transformers' save_pretrained keywords, AutoComoeModelForCausalLM, and push_to_hub; AdapterFolder,
the folder read once, and every loader reading adapter_config.json once."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from comoe.adapter.auto import load_adapter
from comoe.adapter.folder import AdapterFolder, adapter_kind, base_model_of
from comoe.adapter.model import ComoeModel
from comoe.adapter.serialization import CONFIG_NAME, WEIGHTS_NAME, load_config, read_safetensors
from comoe.evaluation.runner import load_for_eval
from comoe.models.auto import AutoComoeModelForCausalLM
from comoe.models.loading import load_base
from tests.helpers import adapted, count_config_reads, tiny_llama


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
    monkeypatch.setattr("comoe.adapter.persistence.HfApi", StandInHub)
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


def test_adapter_folder_holds_what_the_config_records(tiny_model_dir, tmp_path):
    model = adapted(tiny_model_dir)
    model.save_pretrained(tmp_path)
    folder = AdapterFolder.read(str(tmp_path))
    assert (folder.path, folder.kind, folder.weights) == (tmp_path, "comoe", tmp_path / WEIGHTS_NAME)
    assert folder.config == model.comoe_config and folder.config_path == tmp_path / CONFIG_NAME
    assert folder.base_model_name_or_path == str(tiny_model_dir)
    assert folder.values == json.loads((tmp_path / CONFIG_NAME).read_text())
    assert os.fspath(folder) == str(tmp_path)  # an os.PathLike: it goes wherever a path does
    with pytest.raises(dataclasses.FrozenInstanceError):
        folder.kind = "peft"
    with pytest.raises(TypeError):
        folder.values["r"] = 1
    config = load_config(folder)
    assert config == folder.config and config is not folder.config  # a model may change its own copy
    assert (adapter_kind(folder), base_model_of(folder)) == ("comoe", str(tiny_model_dir))


def test_a_peft_folder_reads_as_peft_and_loads(tmp_path):
    peft = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path)
    folder = AdapterFolder.read(tmp_path)
    assert (folder.kind, folder.config, folder.values["peft_type"]) == ("peft", None, "LORA")
    with pytest.raises(ValueError, match="adapter_config.json: not a comoe adapter config"):
        load_config(folder)
    loaded = load_adapter(tiny_llama(), folder)
    assert isinstance(loaded, PeftModel) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def load_for_eval_of(base):
    return lambda adapter: load_for_eval(str(base), str(adapter))


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda d: (d / CONFIG_NAME).unlink(), FileNotFoundError, "no adapter config here"),
        (lambda d: (d / CONFIG_NAME).write_text("{"), ValueError, "adapter_config.json: not valid JSON"),
        (lambda d: (d / CONFIG_NAME).write_text("[]"), ValueError, "expected a JSON object of settings"),
        (lambda d: (d / WEIGHTS_NAME).unlink(), FileNotFoundError, "safetensors: adapter weights not found"),
        (
            lambda d: (d / CONFIG_NAME).write_text(json.dumps({"adapter_type": "comoe", "format_version": 9})),
            ValueError,
            "adapter_config.json: format_version 9 is not supported",
        ),
    ],
)
def test_every_reader_gives_the_same_error_naming_the_file(tiny_model_dir, tmp_path, edit, error, message):
    adapted(tiny_model_dir).save_pretrained(tmp_path)
    edit(tmp_path)
    for read in (AdapterFolder.read, adapter_kind, base_model_of, load_config, load_for_eval_of(tiny_model_dir)):
        with pytest.raises(error, match=message):
            read(tmp_path)


@pytest.mark.parametrize("loader", ["load_for_eval", "load_adapter", "AutoComoeModelForCausalLM"])
@pytest.mark.parametrize("given", ["path", "AdapterFolder"])
def test_loading_an_adapter_reads_its_config_once(tiny_model_dir, tmp_path, monkeypatch, loader, given):
    """Checked before the base model loads, then loaded: one read of adapter_config.json in all (none
    more when the caller passes the AdapterFolder it read), ComoeModel.from_pretrained included."""
    model = adapted(tiny_model_dir)
    model.save_pretrained(tmp_path)
    reads = count_config_reads(monkeypatch)
    source = str(tmp_path) if given == "path" else AdapterFolder.read(tmp_path)
    if loader == "load_for_eval":
        loaded, _ = load_for_eval(str(tiny_model_dir), source)
    elif loader == "load_adapter":
        loaded = load_adapter(load_base(str(tiny_model_dir))[0], source)
    else:
        loaded = AutoComoeModelForCausalLM.from_pretrained(source)
    assert reads == [tmp_path / CONFIG_NAME]
    assert isinstance(loaded, ComoeModel) and not loaded.training
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
