"""The one settings loader: defaults < YAML < flags, renamed and unknown keys, YAML errors, generated flags,
and each command's settings validation (one-line CLI errors before anything heavy is loaded)."""

import argparse
import dataclasses

import pytest

from comoe.analysis.settings import AnalyzeArgs
from comoe.cli import COMMANDS, build_parser, main
from comoe.evaluation.settings import EvalArgs, GenerateArgs
from comoe.recipes.settings import DemoArgs
from comoe.settings import add_flags, load_settings, locate
from comoe.training.settings import TrainArgs
from comoe.validation import InvalidSetting


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
    assert set(COMMANDS) == {"train", "eval", "compare", "generate", "analyze", "demo", "serve"}


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
        (
            TrainArgs,
            {"device": "gpu"},
            "device='gpu' is invalid: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
        ),
        (EvalArgs, {"device": "cuda:x"}, "device='cuda:x' is invalid"),
        (EvalArgs, {"dtype": "fp8"}, "dtype='fp8' is invalid: expected one of 'float32', 'bfloat16'"),
        (AnalyzeArgs, {"adapter": "x", "output": "y", "device": ""}, "device='' is invalid"),
        (GenerateArgs, {"prompt": "hi", "dtype": "int8"}, "dtype='int8' is invalid"),
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


@pytest.mark.parametrize(
    ("text", "message"),
    [  # finding 8 of the reliability review: silent coercions, each now refused with the file's name
        ("epochs: -1\n", r"epochs=-1 is invalid: expected a finite number > 0"),
        ("epochs: 0\n", r"epochs=0 is invalid"),
        ("epochs: .nan\n", r"epochs=nan is invalid"),
        ("epochs: .inf\n", r"epochs=inf is invalid"),
        ("train_limit: 0\n", r"train_limit=0 is invalid: expected an integer >= 1"),
        ("resume: 'no'\n", r"resume='no' is invalid: expected true or false"),
        ("max_steps: 2.5\n", r"max_steps=2.5 is invalid: expected an integer"),
        ("batch_size: true\n", r"batch_size=True is invalid: expected an integer"),
        ("save_steps: -1\n", r"save_steps=-1 is invalid: expected an integer >= 0"),
        ("save_steps: '1'\n", r"save_steps='1' is invalid: expected an integer"),
        ("stats_steps: -3\n", r"stats_steps=-3 is invalid"),
        ("lr: .inf\n", r"lr=inf is invalid"),
        ("tasks: boolq\n", r"tasks='boolq' is invalid: expected a list of strings or null"),
        ("adapter_config: [1]\n", r"adapter_config=\[1\] is invalid: expected a mapping"),
        ("adapter: {top_k: 9}\n", r"adapter_config: top_k=9 is invalid: expected 1 <= top_k <= num_experts"),
        (
            "adapter: {target_modules: '('}\n",
            r"adapter_config: target_modules='\(' is invalid: .*not a valid regular expression",
        ),
        ("adapter: {lora_alpha: .inf}\n", r"adapter_config: lora_alpha=inf is invalid"),
    ],
)
def test_train_yaml_values_are_checked_without_coercion(tmp_path, text, message):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"train.yaml: {message}"):
        load_settings(TrainArgs, path, {})


def test_adapter_override_typos_are_blamed_on_adapter_config(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("adapter: {num_expert: 4}\n")
    with pytest.raises(ValueError, match=r"^adapter_config: unknown fields \['num_expert'\]"):
        load_settings(TrainArgs, path, {})


@pytest.mark.parametrize(
    ("argv", "message"),
    [  # findings 3, 4, 5 and 8 at the command line: one line, exit 2, before any model is loaded
        (["eval", "--batch-size", "-1"], "--batch-size=-1 is invalid: expected an integer >= 1"),
        (["eval", "--limit", "0"], "--limit=0 is invalid"),
        (["train", "--lr", "inf"], "--lr=inf is invalid: expected a finite number"),
        (["train", "--epochs", "nan"], "--epochs=nan is invalid"),
        (["train", "--epochs", "0"], "--epochs=0.0 is invalid: expected a finite number > 0"),
        (["train", "--train-limit", "0", "--data-dir", "."], "--train-limit=0 is invalid"),
        (["train", "--save-steps", "-1"], "--save-steps=-1 is invalid"),
        (["train", "--stats-steps", "-3"], "--stats-steps=-3 is invalid"),
        (["train", "--device", "gpu"], "--device='gpu' is invalid"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"comoe: error: {message}"), err


def test_an_error_found_after_loading_names_where_the_value_came_from(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("adapter: {routing: topkk}\n")  # the older key, renamed to adapter_config
    args = load_settings(TrainArgs, path, {"batch_size": 2, "lr": None})
    late = InvalidSetting("adapter_config", "adapter_config: routing='topkk' is not registered")
    assert str(locate(args, late)) == f"{path}: adapter_config: routing='topkk' is not registered"
    flag = InvalidSetting("batch_size", "batch_size=2 is invalid: expected more")
    assert str(locate(args, flag)) == "--batch-size=2 is invalid: expected more"
    default = InvalidSetting("lr", "lr=0.0002 is invalid")  # neither the file's nor a flag's
    assert locate(args, default) is default
    assert locate(TrainArgs(), late) is late  # settings built without a file or flags
    assert dataclasses.asdict(args) == dataclasses.asdict(load_settings(TrainArgs, path, {"batch_size": 2}))
