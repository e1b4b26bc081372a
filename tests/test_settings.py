"""The one settings loader: defaults < YAML < flags, renamed and unknown keys, YAML errors, generated flags,
and each command's settings validation (one-line CLI errors before anything heavy is loaded)."""

import argparse
import dataclasses

import pytest

from comoe.analysis.settings import AnalyzeArgs
from comoe.cli import COMMANDS, build_parser, main
from comoe.evaluation.settings import EvalArgs
from comoe.recipes.settings import DemoArgs
from comoe.settings import add_flags, load_settings
from comoe.training.settings import TrainArgs


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("limit: 7\nbatch-size: 3\ntasks: [boolq, piqa]\n")
    args = load_settings(EvalArgs, path, {"batch_size": 5, "mode": None})
    assert (args.limit, args.batch_size, args.tasks, args.mode) == (7, 5, ["boolq", "piqa"], "loglik")


def test_train_accepts_the_older_adapter_key(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("adapter: {num_experts: 8}\n")
    assert load_settings(TrainArgs, path, {}).adapter_config == {"num_experts": 8}
    # eval's `adapter` is a folder, not a renamed key
    assert load_settings(EvalArgs, None, {"adapter": "runs/x/adapter"}).adapter == "runs/x/adapter"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limt: 3\n", r"eval.yaml: unknown fields \['limt'\]; valid fields: \['adapter', "),
        ("limit: [3\n", r"eval.yaml: not valid YAML"),
        ("- limit\n", r"eval.yaml: expected a mapping of settings, got list"),
        ("!!python/object:os.system {}\n", r"eval.yaml: not valid YAML"),
    ],
)
def test_bad_yaml_is_a_value_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_settings(EvalArgs, path, {})


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="--config .*nope.yaml: no such file"):
        load_settings(EvalArgs, tmp_path / "nope.yaml", {})


@pytest.mark.parametrize("settings", [TrainArgs, EvalArgs, AnalyzeArgs, DemoArgs])
def test_every_field_has_a_flag_with_help_except_yaml_only_ones(settings):
    parser = argparse.ArgumentParser()
    add_flags(parser, settings)
    flags = {action.dest: action for action in parser._actions if action.dest != "help"}
    for field in dataclasses.fields(settings):
        assert field.metadata["help"], field.name
        assert (field.name in flags) == field.metadata.get("flag", True), field.name
    assert all(action.default is None for action in flags.values())  # unset flags never override YAML


def test_generated_flags_parse_types_lists_choices_and_switches():
    parser = build_parser()
    args = parser.parse_args(
        ["train", "--tasks", "boolq, piqa,", "--lr", "1e-3", "--resume", "--preset", "moe"]
    )
    assert (args.tasks, args.lr, args.resume, args.preset, args.max_steps) == (
        ["boolq", "piqa"],
        1e-3,
        True,
        "moe",
        None,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--mode", "sample"])
    assert set(COMMANDS) == {"train", "eval", "analyze", "demo"}


@pytest.mark.parametrize(
    ("settings", "values", "message"),
    [
        (EvalArgs, {"batch_size": 0}, "batch_size=0 is invalid: expected an integer >= 1"),
        (EvalArgs, {"limit": 0}, "limit=0 is invalid"),
        (EvalArgs, {"max_new_tokens": -1}, "max_new_tokens=-1 is invalid"),
        (EvalArgs, {"mode": "sample"}, "mode='sample' is invalid: expected one of 'loglik', 'generate'"),
        (AnalyzeArgs, {"output": "x"}, "adapter: required"),
        (AnalyzeArgs, {"adapter": "x"}, "output: required"),
        (AnalyzeArgs, {"adapter": "x", "output": "y", "cutoff": 0}, "cutoff=0 is invalid"),
        (DemoArgs, {"max_steps": 0}, "max_steps=0 is invalid"),
        (TrainArgs, {"batch_size": 0}, "batch_size=0 is invalid"),
    ],
)
def test_settings_validate_with_the_field_value_and_range(settings, values, message):
    with pytest.raises(ValueError, match=message):
        settings(**values)


def test_cli_reports_bad_settings_in_one_line_before_loading_a_model(capsys):
    assert main(["eval", "--batch-size", "0", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "comoe: error: --batch-size=0 is invalid: expected an integer >= 1 (run with --debug for the traceback)"
    ]
