"""An adapter runs on the base model it was trained on (the reliability review's kind 5): without --model,
eval, generate and analyze load the base the adapter folder records (a local folder recorded as its
absolute path, so any working directory finds it); another base of the same shapes is named in a warning,
one of other shapes is refused with one line naming the recorded base."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from comoe.adapter.folder import CONFIG_NAME, AdapterFolder
from comoe.cli import main
from comoe.evaluation.runner import load_for_eval
from comoe.models.auto import DEFAULT_BASE, base_model_name
from comoe.models.loading import load_base, recorded_name, same_model
from comoe.training.loop import train
from tests.helpers import one_line_error, tiny_config, tiny_llama, train_args

EVAL = ["--tasks", "chain_sum", "--limit", "2", "--mode", "generate", "--max-new-tokens", "6"]
PROMPT = ["--prompt", "What is 2 + 3?", "--max-new-tokens", "6"]


def save_model(model, folder: Path, tokenizer) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def same_shapes_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """Folder B: the tiny LLaMA's shapes, other weights."""
    return save_model(
        tiny_llama(seed=1, vocab=len(smol_tokenizer)), tmp_path_factory.mktemp("B"), smol_tokenizer
    )


@pytest.fixture(scope="module")
def other_shapes_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """Folder C: a narrower LLaMA (hidden size 32)."""
    torch.manual_seed(2)
    config = tiny_config(
        vocab_size=len(smol_tokenizer), hidden_size=32, num_attention_heads=2, num_key_value_heads=1
    )
    return save_model(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("C"), smol_tokenizer)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A comoe adapter trained 2 steps on folder A (the tiny model), named by a relative path at training."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tiny_model_dir.parent)
        run = train(
            train_args(Path(tiny_model_dir.name), out / "run", max_steps=2, save_steps=0, stats_steps=0)
        )
    return run / "adapter"


def eval_report(argv: list[str], out: Path) -> dict:
    assert main(["eval", *argv, *EVAL, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def generated(argv: list[str], out: Path) -> list[dict]:
    assert main(["generate", *argv, *PROMPT, "--output", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_relative_model_folder_is_recorded_as_its_absolute_path_and_found_from_elsewhere(
    adapter, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    recorded = json.loads((adapter / CONFIG_NAME).read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_model_dir) and os.path.isabs(recorded)
    assert AdapterFolder.read(adapter).base_model_name_or_path == recorded
    monkeypatch.chdir(tmp_path)  # where the relative name means nothing
    assert not Path(tiny_model_dir.name).exists()
    (row,) = generated(["--adapter", str(adapter)], tmp_path / "default.jsonl")
    (explicit,) = generated(["--adapter", str(adapter), "--model", recorded], tmp_path / "explicit.jsonl")
    assert row == explicit
    assert "trained on" not in capsys.readouterr().err  # the recorded base given by name: no warning


def test_eval_without_model_uses_the_recorded_base(adapter, tiny_model_dir, same_shapes_dir, tmp_path):
    default = eval_report(["--adapter", str(adapter)], tmp_path / "default.json")
    explicit = eval_report(["--adapter", str(adapter), "--model", str(tiny_model_dir)], tmp_path / "a.json")
    other = eval_report(["--adapter", str(adapter), "--model", str(same_shapes_dir)], tmp_path / "b.json")
    assert default["model"] == explicit["model"] == str(tiny_model_dir)  # the report names the base it ran
    assert default["examples"] == explicit["examples"]
    assert other["model"] == str(same_shapes_dir) and other["examples"] != default["examples"]


def test_generate_without_model_uses_the_recorded_base(adapter, tiny_model_dir, same_shapes_dir, tmp_path):
    default = generated(["--adapter", str(adapter)], tmp_path / "default.jsonl")
    assert default == generated(
        ["--adapter", str(adapter), "--model", str(tiny_model_dir)], tmp_path / "a.jsonl"
    )
    assert default != generated(
        ["--adapter", str(adapter), "--model", str(same_shapes_dir)], tmp_path / "b.jsonl"
    )


def test_analyze_without_model_uses_the_recorded_base(adapter, tiny_model_dir, tmp_path):
    argv = ["analyze", "--adapter", str(adapter), "--tasks", "chain_sum,syllogism", "--limit", "2"]
    assert main([*argv, "--output", str(tmp_path / "default")]) == 0
    assert main([*argv, "--model", str(tiny_model_dir), "--output", str(tmp_path / "explicit")]) == 0
    default, explicit = (
        json.loads((tmp_path / n / "summary.json").read_text()) for n in ("default", "explicit")
    )
    assert default["model"] == str(tiny_model_dir)
    assert {k: v for k, v in default.items() if k != "model"} == {
        k: v for k, v in explicit.items() if k != "model"
    }


def test_another_base_of_the_same_shapes_is_named_in_a_warning(
    adapter, tiny_model_dir, same_shapes_dir, capsys
):
    warning = (
        f"{adapter} was trained on base model {tiny_model_dir}; running it on {same_shapes_dir}, whose shapes "
        "fit it (leave out --model to use the recorded base)"
    )
    assert main(["eval", "--adapter", str(adapter), "--model", str(same_shapes_dir), *EVAL]) == 0
    assert warning in capsys.readouterr().out.splitlines()  # eval's progress and warnings: stdout
    assert main(["generate", "--adapter", str(adapter), "--model", str(same_shapes_dir), *PROMPT]) == 0
    out, err = capsys.readouterr()
    assert warning in err.splitlines()  # generate's: stderr, so that stdout is only the JSONL rows
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["What is 2 + 3?"]


def test_the_same_base_by_another_name_gives_no_warning(
    adapter, tiny_model_dir, tmp_path, monkeypatch, caplog
):
    link = tmp_path / "link-to-a"
    link.symlink_to(tiny_model_dir)
    monkeypatch.chdir(tiny_model_dir.parent)
    for name in (tiny_model_dir.name, f"./{tiny_model_dir.name}/", str(link)):
        assert same_model(name, str(tiny_model_dir))
        load_for_eval(name, str(adapter), device="cpu")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("command", ["eval", "generate", "analyze"])
def test_a_base_of_other_shapes_is_refused_naming_the_recorded_base(
    command, adapter, tiny_model_dir, other_shapes_dir, tmp_path, capsys
):
    extra = {"eval": EVAL, "generate": PROMPT, "analyze": ["--output", str(tmp_path / "analysis")]}[command]
    message = one_line_error(
        capsys, [command, "--adapter", str(adapter), "--model", str(other_shapes_dir), *extra]
    )
    assert message.startswith(
        f"comoe: error: {adapter} was trained on base model {tiny_model_dir}, and {other_shapes_dir} does not "
        "fit it (shape mismatch model.layers.0.self_attn.k_proj.lora_A: saved (4, 4, 64), model (4, 4, 32), "
        "and 23 more); leave out --model to use "
    )
    assert "missing in file" not in message


def test_a_peft_adapter_runs_on_its_recorded_base_too(
    tiny_model_dir, same_shapes_dir, other_shapes_dir, tmp_path, capsys
):
    base, _ = load_base(str(tiny_model_dir))
    lora = tmp_path / "lora"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        lora
    )
    default = generated(["--adapter", str(lora)], tmp_path / "default.jsonl")
    assert default == generated(
        ["--adapter", str(lora), "--model", str(tiny_model_dir)], tmp_path / "a.jsonl"
    )
    capsys.readouterr()
    assert main(["generate", "--adapter", str(lora), "--model", str(same_shapes_dir), *PROMPT]) == 0
    assert (
        f"{lora} was trained on base model {tiny_model_dir}; running it on {same_shapes_dir}"
        in capsys.readouterr().err
    )
    message = one_line_error(
        capsys, ["eval", "--adapter", str(lora), "--model", str(other_shapes_dir), *EVAL]
    )
    assert message.startswith(
        f"comoe: error: {lora} was trained on base model {tiny_model_dir}, and {other_shapes_dir} does not fit it "
        "(this PEFT adapter does not fit the base model (size mismatch for "
    )


def test_a_recorded_base_that_is_gone_is_one_line_naming_it(adapter, tiny_model_dir, tmp_path, capsys):
    moved = tmp_path / "adapter"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / CONFIG_NAME).write_text(json.dumps(config))
    message = one_line_error(capsys, ["generate", "--adapter", str(moved), *PROMPT])
    assert message.startswith(
        f"comoe: error: {moved} was trained on base model {tmp_path / 'gone'}, which is not here"
    )
    assert message.endswith("; give --model (run with --debug for the traceback)")
    assert main(["generate", "--adapter", str(moved), "--model", str(tiny_model_dir), *PROMPT]) == 0


def test_the_base_model_name_defaults(adapter, tiny_model_dir, tmp_path, monkeypatch):
    folder = AdapterFolder.read(adapter)
    assert base_model_name(None, folder) == str(tiny_model_dir)
    assert base_model_name("other", folder) == "other"
    assert base_model_name(None, None) == DEFAULT_BASE == "smollm2-135m"
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(adapter, unrecorded)
    config = json.loads((unrecorded / CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = None
    (unrecorded / CONFIG_NAME).write_text(json.dumps(config))
    assert base_model_name(None, AdapterFolder.read(unrecorded)) == DEFAULT_BASE
    # aliases and hub ids are recorded as given; only a local folder becomes absolute
    monkeypatch.chdir(tiny_model_dir.parent)
    assert recorded_name("smollm2-135m") == "smollm2-135m"
    assert recorded_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert recorded_name(tiny_model_dir.name) == str(tiny_model_dir)
    model, _ = load_base(tiny_model_dir.name)
    assert model.config._name_or_path == str(tiny_model_dir)
