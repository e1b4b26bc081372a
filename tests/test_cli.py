"""Every user error at the command line is one line and exit 2, Ctrl-C one line and exit 130 (findings 5
and 7 of the reliability review); each case fails fast, before work that would be lost. The progress and
warnings the library logs are shown on stdout while a command runs."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

import comoe.training.loop as loop
from comoe.cli import _compare_sides, main
from tests.helpers import one_line_error, tiny_config, tiny_llama


def test_train_shows_the_library_progress_and_warnings_as_plain_lines(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "a.yaml").write_text("adapter_config: {r: 4, num_experts: 4}\n")
    run = tmp_path / "r"
    argv = ["train", "--model", str(tiny_model_dir), "--train-limit", "4", "--batch-size", "4"]
    argv += ["--cutoff", "96", "--max-steps", "4", "--save-steps", "2", "--max-grad-norm", "0.001"]
    argv += ["--config", str(tmp_path / "a.yaml"), "--output", str(run)]
    logger = logging.getLogger("comoe")
    before = (list(logger.handlers), logger.level)
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("training comoe on 20 examples (0 cut at 96 tokens), 4 steps")  # no prefix
    assert sum("was clipped to 0.001" in line for line in lines) == 1
    assert lines[-1] == f"adapter saved to {run / 'adapter'}"
    assert main([*argv, "--resume"]) == 0  # the run is complete: it resumes from its last checkpoint
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} (step 2)" in capsys.readouterr().out.splitlines()
    assert (list(logger.handlers), logger.level) == before  # as it was: nothing printed outside the CLI


def test_missing_model_folder(capsys, tmp_path):
    message = one_line_error(capsys, ["train", "--model", "/nonexistent", "--output", str(tmp_path / "r")])
    assert "model '/nonexistent': no such folder" in message


def test_output_that_is_a_file(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "file").write_text("x")
    message = one_line_error(
        capsys, ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "file")]
    )
    assert "is a file, not a folder" in message
    message = one_line_error(
        capsys, ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "file" / "run")]
    )
    assert "Not a directory" in message or "not a folder" in message


def test_eval_output_that_is_a_folder_is_refused_before_evaluating(capsys, tmp_path):
    message = one_line_error(capsys, ["eval", "--model", "/nonexistent", "--output", str(tmp_path)])
    assert "is a folder; give the report's file name" in message  # checked before the model is looked for
    message = one_line_error(capsys, ["eval", "--model", "/nonexistent", "--output", str(tmp_path / "r.md")])
    assert message.startswith(f"comoe: error: --output {tmp_path / 'r.md'}: give the report's name (e.g. ")


def test_broken_and_mistyped_yaml(capsys, tmp_path):
    for text, expected in [
        ("lr: [1\n", "not valid YAML"),
        ("save_steps: '1'\n", "save_steps='1' is invalid"),
        ("!!python/object:os.system {}\n", "not valid YAML"),
        ("- 1\n", "expected a mapping of settings"),
    ]:
        (tmp_path / "c.yaml").write_text(text)
        assert expected in one_line_error(capsys, ["train", "--config", str(tmp_path / "c.yaml")])


def test_cutoff_that_leaves_no_response_token(capsys, tmp_path, tiny_model_dir):
    argv = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--cutoff",
        "1",
        "--train-limit",
        "2",
        "--output",
        str(tmp_path / "r"),
    ]
    message = one_line_error(capsys, argv)
    assert "cutoff=1 leaves no response token in any of the 10 examples" in message
    assert not (tmp_path / "r").exists()


def test_invalid_target_pattern_in_an_adapter_config(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("adapter_config: {target_modules: '(q|k'}\n")
    assert "not a valid regular expression" in one_line_error(
        capsys, ["train", "--config", str(tmp_path / "c.yaml")]
    )


def test_peft_adapter_on_the_wrong_base(capsys, tmp_path, tiny_model_dir):
    torch.manual_seed(0)
    other = type(tiny_llama())(tiny_config(hidden_size=32, intermediate_size=48))
    peft = get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "lora")
    argv = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(tmp_path / "lora"),
        "--tasks",
        "syllogism",
        "--limit",
        "1",
    ]
    message = one_line_error(capsys, argv)
    assert "this PEFT adapter does not fit the base model" in message and "size mismatch" in message


def test_ctrl_c_during_training_says_where_it_stopped(capsys, tmp_path, tiny_model_dir, monkeypatch):
    calls = {"n": 0}
    original = loop.optimizer_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "optimizer_step", interrupted)
    (tmp_path / "a.yaml").write_text("adapter_config: {r: 4, num_experts: 4}\n")
    argv = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--train-limit",
        "4",
        "--batch-size",
        "4",
        "--cutoff",
        "96",
    ]
    argv += [
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--config",
        str(tmp_path / "a.yaml"),
        "--output",
        str(tmp_path / "r"),
    ]
    message = one_line_error(capsys, argv, code=130)
    assert message == (
        f"comoe: interrupted at step 2 of 4; the last checkpoint is step-000002; continue with the same command "
        f"and --resume (--output {tmp_path / 'r'})"
    )


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_ctrl_c_elsewhere_is_one_line(capsys, monkeypatch, command):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    # pipeline first: imported while runner's is patched, it would keep `stop` after this test is undone
    monkeypatch.setattr("comoe.analysis.pipeline.load_for_eval", stop)
    monkeypatch.setattr("comoe.evaluation.runner.load_for_eval", stop)
    argv = [command, "--adapter", "x", "--output", "y"] if command == "analyze" else [command]
    assert one_line_error(capsys, argv, code=130) == "comoe: interrupted"


def test_compare_sides_between_separators_are_joined_before_argparse():
    assert _compare_sides(["compare", "a0", "a1", "--", "b0", "b1"]) == ["compare", "a0,a1", "b0,b1"]
    argv = ["--debug", "compare", "a0", "--output", "out.json", "a1", "--", "b0", "--samples", "200", "--", "c"]
    assert _compare_sides(argv) == [
        "--debug", "compare", "--output", "out.json", "--samples", "200", "a0,a1", "b0", "c"
    ]
    assert _compare_sides(["compare", "a", "b"]) == ["compare", "a", "b"]  # no separator: one report a side
    assert _compare_sides(["eval", "--", "x"]) == ["eval", "--", "x"]  # other commands are left alone
    assert _compare_sides(["compare", "a", "--", "b", "--output"]) == ["compare", "--output", "a", "b"]
    assert _compare_sides(["compare", "a", "--seed=3", "--", "b"]) == ["compare", "--seed=3", "a", "b"]


def test_long_answers_are_cut_on_the_eval_table_line():
    from comoe.cli import _baselines, _short

    assert _short("yes") == "'yes'"
    long = "a generated answer that goes on and on for far too long to read"
    assert _short(long) == repr(long)[:36] + "...'" and len(_short(long)) == 40
    apostrophe = "the model's answer goes on and on for far too long to read"  # repr quotes it with "
    assert _short(apostrophe) == '"the model\'s answer goes on and on f..."' and len(_short(apostrophe)) == 40
    row = {"n": 2, "chance": None, "predicted": {long: 2}}
    assert _baselines(row) == f"predicted {_short(long)} 100%"


def test_train_refuses_an_unregistered_name_before_loading_a_model(tmp_path, monkeypatch, capsys):
    from comoe.training import factory

    monkeypatch.setattr(factory, "load_base", lambda *a, **k: pytest.fail("the base model was loaded"))
    config = tmp_path / "run.yaml"
    config.write_text("adapter_config: {expert_bank: hidra}\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"comoe: error: {config}: adapter_config: expert_bank='hidra' is not a registered")
    assert len(err.splitlines()) == 1
