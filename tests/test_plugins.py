"""Plugins: a module of the user's own, imported by --plugin, COMOE_PLUGINS or a registry's first miss,
registers a record format, an objective and an expert bank that the CLI and loading then find; an adapter
whose objective is not registered still loads for inference."""

import json
import sys
import textwrap

import pytest
import torch

from comoe import ComoeConfig, ComoeModel, get_comoe_model, plugins
from comoe.cli import main
from comoe.moe.banks import BANKS
from comoe.objectives.registry import OBJECTIVES, get_objective
from tests.helpers import tiny_llama, write_jsonl

PLUGIN = textwrap.dedent(
    '''
    """A user's extensions: a {question, reply} record format and a toy objective."""
    from comoe.data.formats import Content, RecordFormat, register_format, nonempty_field, response_field
    from comoe.objectives.registry import Objective, register_objective


    class QuestionReply(RecordFormat):
        def content(self, record, template, where):
            question = nonempty_field(record, "question", where)
            reply = response_field(record, "reply", where)
            return Content(question, "", reply, (("user", question), ("assistant", reply)))


    register_format(QuestionReply("question_reply", ("question", "reply"), "alpaca", "reply"))
    register_objective(
        Objective("b_norm", lambda record, config: record.lora_B.pow(2).mean(), component="b_norm")
    )
    '''
)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plugin module on sys.path; every registry and plugin record restored afterwards."""
    from comoe.data.formats import RECORD_FORMATS

    name = f"user_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_loaded", set())
    monkeypatch.setattr(plugins, "_discovered", False)
    saved = dict(OBJECTIVES), dict(RECORD_FORMATS), dict(BANKS)
    yield name
    for registry, before in zip((OBJECTIVES, RECORD_FORMATS, BANKS), saved, strict=True):
        registry.clear()
        registry.update(before)
    sys.modules.pop(name, None)


def test_load_plugins_imports_each_module_once_and_names_the_one_that_fails(plugin, monkeypatch):
    monkeypatch.delenv(plugins.ENVIRONMENT_VARIABLE, raising=False)
    assert plugins.load_plugins([plugin]) == [plugin]
    assert "b_norm" in OBJECTIVES
    assert plugins.load_plugins([plugin]) == []
    with pytest.raises(ValueError, match="plugin 'no_such_module_here' could not be imported"):
        plugins.load_plugins(["no_such_module_here"])


def test_a_registry_miss_imports_the_environments_plugins_once(plugin, monkeypatch):
    monkeypatch.setenv(plugins.ENVIRONMENT_VARIABLE, f" {plugin} ,")
    assert plugins.plugin_modules() == [plugin]
    assert get_objective("b_norm").component == "b_norm"  # imported on the miss
    with pytest.raises(ValueError, match="'nothing' is not registered"):
        get_objective("nothing")  # the plugins were imported once; no second attempt


def test_the_cli_trains_on_a_plugins_format_and_objective(
    plugin, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv(plugins.ENVIRONMENT_VARIABLE, raising=False)
    rows = [{"question": f"What is {i} plus 1?", "reply": str(i + 1)} for i in range(6)]
    data = write_jsonl(tmp_path / "qr.jsonl", rows)
    config = tmp_path / "train.yaml"
    config.write_text("adapter_config:\n  aux_objectives: {b_norm: 1.0}\n  r: 4\n")
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--format", "question_reply"]
    argv += ["--config", str(config), "--max-steps", "2", "--batch-size", "2", "--output", str(run)]
    argv += ["--stats-steps", "0", "--save-steps", "0"]
    assert main([*argv, "--plugin", plugin]) == 0
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(row["b_norm"] >= 0 for row in rows) and rows[-1]["b_norm"] > 0
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["aux_objectives"] == {
        "b_norm": 1.0
    }


def test_without_the_plugin_the_format_is_one_line_naming_the_registered_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(plugins.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(plugins, "_discovered", False)
    data = write_jsonl(tmp_path / "qr.jsonl", [{"question": "q", "reply": "r"}])
    code = main(["train", "--model", "missing-model", "--data", str(data), "--format", "question_reply"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert (
        "format='question_reply' is invalid: expected auto or one of instruction, prompt_completion, messages"
        in error
    )


def test_an_adapter_whose_objective_is_not_registered_loads_for_inference(
    plugin, tmp_path, monkeypatch, caplog
):
    plugins.load_plugins([plugin])
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", r=4, aux_objectives={"b_norm": 0.5}))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(ids).logits
    del OBJECTIVES["b_norm"]  # a new process without the plugin
    monkeypatch.delenv(plugins.ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.setattr(plugins, "_discovered", True)
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert "b_norm are not registered in this process" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
        loaded(input_ids=ids, labels=ids)  # evaluation with labels: reported losses, no error
    assert loaded.comoe_config.aux_objectives == {"b_norm": 0.5}  # kept for saving
    with pytest.raises(ValueError, match="'b_norm' is not registered"):
        ComoeModel.from_pretrained(tiny_llama(), tmp_path / "adapter", is_trainable=True)


def test_a_registry_finds_registers_and_refuses_by_name(monkeypatch):
    discoveries = []
    monkeypatch.setattr(plugins, "discover_once", lambda: discoveries.append(1) or False)
    table = plugins.Registry("expert_bank", "expert bank")

    class Toy:
        name = "toy"

    assert table.register(Toy) is Toy and table.lookup("toy") is Toy and discoveries == []
    with pytest.raises(ValueError, match=r"expert_bank='tied' is not a registered expert bank; valid: toy \("):
        table.lookup("tied")
    assert discoveries == [1]  # a miss imports the plugins before it is refused
    table.unregister("toy")
    assert "toy" not in table
