"""A resumed run is the run it claims to be (findings 1, 2, 9 of the reliability review): settings
identity on --resume, an exclusive lock held by two real processes, and a failed start leaving the output
folder as it was."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from comoe.cli import main
from comoe.training.loop import train
from comoe.training.rundir import LOCK_NAME, RunLock
from tests.helpers import train_args

ADAPTER_YAML = "adapter_config: {r: 4, num_experts: 4}\n"


def cli_train(model_dir, out, *extra):
    """`comoe train` with the settings of tests.helpers.train_args, as command-line flags."""
    (out.parent / "adapter.yaml").write_text(ADAPTER_YAML)
    flags = ["--model", str(model_dir), "--train-limit", "4", "--max-steps", "4", "--batch-size", "4"]
    flags += ["--cutoff", "96", "--save-steps", "2", "--lr", "0.001", "--output", str(out)]
    return ["train", *flags, "--config", str(out.parent / "adapter.yaml"), *extra]


@pytest.mark.parametrize(
    ("change", "listed"),
    [
        (["--lr", "0.005"], "lr: 0.001 -> 0.005"),
        (["--seed", "3"], "seed: 0 -> 3"),
        (["--preset", "moe"], "preset: 'comoe' -> 'moe'"),
        (["--preset", "lora"], "preset: 'comoe' -> 'lora'"),
        (["--batch-size", "2"], "batch_size: 4 -> 2"),
        (["--train-limit", "3", "--max-steps", "5"], "train_limit: 4 -> 3; max_steps: 4 -> 5"),
    ],
)
def test_resume_refuses_changed_settings_and_leaves_config_unchanged(
    tiny_model_dir, tmp_path, capsys, change, listed
):
    run = tmp_path / "run"
    assert main(cli_train(tiny_model_dir, run)) == 0
    before = (run / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main([*cli_train(tiny_model_dir, run), "--resume", *change]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "settings differ from" in err and listed in err, err
    assert (run / "config.yaml").read_bytes() == before
    assert not (run / LOCK_NAME).exists()


def test_resume_accepts_changes_that_do_not_change_the_result_and_records_them(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    train(train_args(tiny_model_dir, run, max_steps=4, save_steps=2))
    train(train_args(tiny_model_dir, run, max_steps=4, save_steps=3, stats_steps=1, resume=True))
    assert yaml.safe_load((run / "config.yaml").read_text())["save_steps"] == 3


def test_a_failed_start_leaves_the_output_folder_as_it_was(tiny_model_dir, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    for _ in range(2):  # the same command twice: the same error, never "not empty: pass --resume"
        assert main(["train", "--model", str(tmp_path / "no-such-model"), "--output", str(fresh)]) == 2
        assert "no such folder" in capsys.readouterr().err
        assert not fresh.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_model_dir),
                "--data-dir",
                str(tmp_path),
                "--tasks",
                "boolq",
                "--output",
                str(empty),
            ]
        )
        == 2
    )
    assert list(empty.iterdir()) == []


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(f"{dead.pid}\n")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert f"left by pid {dead.pid} (no longer running)" in caplog.text  # a warning of the "comoe" logger
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow  # two real training processes
def test_a_second_process_on_the_same_run_is_refused_with_the_holders_pid(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = cli_train(tiny_model_dir, run)
    long = [a if a != "4" or args[i - 1] != "--max-steps" else "100000" for i, a in enumerate(args)]
    first = subprocess.Popen(
        [sys.executable, "-m", "comoe.cli", *long], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 120
        while not (run / "log.jsonl").exists() and time.time() < deadline:  # training has started
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read().decode()
        second = subprocess.run(
            [sys.executable, "-m", "comoe.cli", *long, "--resume"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert (
            lines[-1].startswith("comoe: error: --output")
            and f"in use by another comoe process (pid {first.pid})" in lines[-1]
        )
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run / LOCK_NAME).read_text().strip() == str(first.pid)  # left behind by the killed process
    assert main([*cli_train(tiny_model_dir, tmp_path / "other")]) == 0  # other folders are unaffected


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tiny_model_dir, tmp_path, capsys, caplog):
    straight = train(train_args(tiny_model_dir, tmp_path / "straight", max_steps=4, save_steps=1))
    run = tmp_path / "run"
    train(train_args(tiny_model_dir, run, max_steps=4, save_steps=1))
    (run / "adapter").rename(tmp_path / "discarded")
    (run / "checkpoints" / "step-000003" / "optimizer.safetensors").write_bytes(b"\x00" * 20)
    (run / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{not json")
    capsys.readouterr()
    caplog.set_level(logging.INFO, logger="comoe")
    train(train_args(tiny_model_dir, run, max_steps=4, save_steps=1, resume=True))
    out = caplog.text
    assert "skipping step-000003" in out and "skipping step-000002" in out and "resumed from" in out
    assert "step-000001 (step 1)" in out
    assert capsys.readouterr().out == ""  # logged, not printed
    expected = load_file(Path(straight) / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all((expected[k] == got[k]).all() for k in expected)
    for step in (1, 2, 3):
        (run / "checkpoints" / f"step-00000{step}" / "trainer_state.json").write_text("[]")
    with pytest.raises(ValueError, match="none of the 3 checkpoints .* is intact"):
        train(train_args(tiny_model_dir, run, max_steps=4, save_steps=1, resume=True))
