"""README.md's examples run as written: the minimal Python example and the Trainer / TRL examples (on the
real SmolLM2-135M), and the own-data example (on a tiny model)."""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from comoe.cli import main
from comoe.config import PRESETS, ComoeConfig
from comoe.training.settings import METHODS

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_minimal_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = blocks[0]
    assert "get_comoe_model" in example and "save_pretrained" in example
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "'contrastive':" in printed
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert namespace["steps"], "record_routing() recorded no layer"


@pytest.mark.slow
def test_trainer_and_trl_examples_run_as_written(tmp_path, monkeypatch):
    """ComoeTrainer (20 steps), the adapter folder reloaded on its own, then ComoeSFTTrainer on it."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    examples = [b for b in blocks if "Trainer" in b or "AutoComoeModelForCausalLM" in b]
    assert len(examples) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for example in examples:
        exec(compile(example, "README.md", "exec"), namespace)
        if "ComoeTrainer(" in example:
            rows = [row for row in namespace["trainer"].state.log_history if "loss" in row]
            assert rows and all(row["contrastive"] > 0 for row in rows)
    for run, step in (("hf", 10), ("sft", 4)):
        checkpoint = tmp_path / "runs" / run / f"checkpoint-{step}"
        assert (checkpoint / "adapter_model.safetensors").is_file(), checkpoint
        assert not (checkpoint / "model.safetensors").exists()
    rows = [row for row in namespace["trainer"].state.log_history if "loss" in row]
    assert rows and all(row["contrastive"] > 0 and row["task"] > 0 for row in rows)


def test_own_data_example_runs_as_written(tmp_path, monkeypatch, tiny_model_dir):
    """The 'Your own data' JSONL and its three commands, on a tiny model instead of SmolLM2."""
    text = README.read_text()
    (jsonl,) = re.findall(r"```jsonl\n(.*?)```", text, flags=re.S)
    assert len(jsonl.splitlines()) == 10
    section = text.split("## Your own data", 1)[1].split("\n- ", 1)[0]
    commands = re.findall(r"^    (comoe .*?)(?<!\\)$", section.replace("\\\n", " "), flags=re.M)
    assert [c.split()[1] for c in commands] == ["train", "eval", "generate"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jsonl").write_text(jsonl)
    for command in commands:
        argv = shlex.split(command)[1:]
        assert main([*argv, "--model", str(tiny_model_dir)]) == 0, command
    log = [json.loads(line) for line in (tmp_path / "runs/mine/log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "val_loss" in row] == [5, 10, 15, 20]
    assert (tmp_path / "runs/mine/best-adapter/validation.json").is_file()


@pytest.mark.slow
def test_is_my_adapter_better_workflow_runs_as_written(tmp_path, monkeypatch, tiny_model_dir, capsys):
    """The five lines of 'Is my adapter better?' on a tiny model (train gets --model and a few steps), with
    multiple-choice data of two tasks; the seed line on copies of the two reports."""
    section = README.read_text().split("## Is my adapter better?", 1)[1].split("\n- ", 1)[0]
    commands = re.findall(r"^    (comoe .*)$", section, flags=re.M)
    assert [c.split()[1] for c in commands] == ["train", "train", "eval", "compare", "compare"]
    monkeypatch.chdir(tmp_path)
    for name, count in (("train", 12), ("test", 6)):
        rows = [
            {"task": task, "prompt": f"{name} {i} {task}?", "completion": f" {word}", "choices": [" yes", " no"]}
            for i in range(count)
            for task, word in (("light", "yes" if i % 2 else "no"), ("door", "no" if i % 3 else "yes"))
        ]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for command in commands[:2]:
        extra = ["--model", str(tiny_model_dir), "--max-steps", "2", "--batch-size", "4"]
        assert main([*shlex.split(command)[1:], *extra]) == 0, command
    for command in commands[2:4]:
        assert main(shlex.split(command)[1:]) == 0, command
    printed = capsys.readouterr().out
    assert printed.count("verdict: ") == 4  # eval: every pair of base, lora, comoe; compare: comoe − lora
    assert "comoe/adapter − lora/adapter (accuracy %, difference in points)" in printed
    for method in ("lora", "comoe"):
        for seed in range(3):
            shutil.copy(tmp_path / f"runs/eval.{method}-adapter.json", tmp_path / f"{method}-s{seed}.json")
    assert main(shlex.split(commands[4])[1:]) == 0
    assert "95% CI, seeds (t)" in capsys.readouterr().out
    assert (tmp_path / "runs/eval.md").is_file() and (tmp_path / "runs/eval.png").is_file()


def test_the_preset_flag_and_the_router_options_name_every_preset():
    text = README.read_text(encoding="utf-8")
    bullet = text[text.index("- `--preset`:") :].split("\n- `", 1)[0]
    assert [name for name in METHODS if f"`{name}`" not in bullet] == []
    options = (README.parent / "docs" / "methods" / "router-options.md").read_text(encoding="utf-8")
    assert [name for name in PRESETS if f"`{name}`" not in options.split("|", 1)[0]] == []
    balance = next(line for line in options.splitlines() if line.startswith("| `balance_weight` |"))
    for name in PRESETS:  # each preset's default balance weight, as its config sets it
        weight = ComoeConfig.preset(name).balance_weight
        assert weight == 0 or re.search(rf"`{re.escape(name)}`[^|]*?: {weight:g}\b", balance), name
