"""Crash safety: a run killed with SIGKILL resumes to the same adapter; half-written checkpoints and bad
adapter files are refused cleanly; non-finite losses stop (or are skipped) with a clear message."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from comoe.cli import main
from comoe.errors import NonFiniteLoss
from comoe.training.checkpoint import latest_checkpoint
from comoe.training.loop import train
from tests.helpers import train_args


def _train_command(model_dir, out, *extra):
    return [
        sys.executable,
        "-m",
        "comoe.cli",
        "train",
        "--model",
        str(model_dir),
        "--train-limit",
        "4",
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--cutoff",
        "96",
        "--save-steps",
        "2",
        "--lr",
        "0.001",
        "--output",
        str(out),
        "--config",
        str(out.parent / "adapter.yaml"),
        *extra,
    ]


@pytest.mark.slow  # a real subprocess killed mid-run
def test_sigkill_then_resume_gives_the_same_adapter(tiny_model_dir, tmp_path):
    (tmp_path / "adapter.yaml").write_text("adapter:\n  r: 4\n")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_command(tiny_model_dir, straight), check=True, capture_output=True, timeout=300)
    process = subprocess.Popen(
        _train_command(tiny_model_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-000002").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter").exists(), "the run finished before it could be killed"
    subprocess.run(
        _train_command(tiny_model_dir, killed, "--resume"), check=True, capture_output=True, timeout=300
    )
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_half_written_checkpoint_is_ignored(tiny_model_dir, tmp_path):
    run = train(train_args(tiny_model_dir, tmp_path / "run", max_steps=3))
    partial = run / "checkpoints" / ".tmp-step-000003"
    (partial / "adapter").mkdir(parents=True)
    (partial / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(run).name == "step-000002"


def test_nonfinite_loss_stops_with_step_and_component(tiny_model_dir, tmp_path, monkeypatch):
    import comoe.training.loop as training

    original = training.response_loss
    calls = {"n": 0}

    def poisoned(model, batch, world):  # the second batch has a NaN loss
        calls["n"] += 1
        task, aux = original(model, batch, world)
        return (task * float("nan") if calls["n"] == 2 else task), aux

    monkeypatch.setattr(training, "response_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"step 2: non-finite task loss .*--skip-nonfinite"):
        train(train_args(tiny_model_dir, tmp_path / "nan"))
    calls["n"] = 0
    run = train(train_args(tiny_model_dir, tmp_path / "skip", skip_nonfinite=True, max_steps=3))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3] and [row["skipped"] for row in log] == [0, 1, 1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter weights not found"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x01\x02"), "truncated or corrupted"),
        (lambda d: _edit_config(d, lambda c: c.update(num_expertz=4)), "unknown fields \\['num_expertz'\\]"),
        # shapes are read from the file's header first: no 256 GB allocation for num_experts = 10**9
        (
            lambda d: _edit_config(d, lambda c: c.update(num_experts=10**9)),
            r"does not fit the adapter its config describes on this base model \(shape mismatch: .*model \(1000000000, 4, 64\)",
        ),
        (lambda d: _edit_config(d, lambda c: c.update(top_k=9)), "top_k=9 is invalid"),
        (
            lambda d: _edit_config(d, lambda c: c.update(format_version=99)),
            "format_version 99 is not supported",
        ),
        (lambda d: (d / "adapter_config.json").write_text("{"), "not valid JSON"),
    ],
)
def test_bad_adapter_folders_give_one_line_cli_errors(tiny_model_dir, tmp_path, capsys, edit, message):
    run = train(train_args(tiny_model_dir, tmp_path / "run", max_steps=1))
    edit(run / "adapter")
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(run / "adapter"),
            "--tasks",
            "syllogism",
            "--limit",
            "1",
        ]
    )
    captured = capsys.readouterr().err
    err = captured.strip().splitlines()[-1]  # after any progress bars of the model loader
    assert code == 2 and err.startswith("comoe: error:") and "Traceback" not in captured
    assert __import__("re").search(message, err), err


def _edit_config(directory, change):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError):
        main(["--debug", "train", "--batch-size", "0", "--output", str(tmp_path / "x")])
