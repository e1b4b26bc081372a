"""Multi-process training on CPU (gloo): two processes under torchrun end with the adapter of one process
holding the same global batch, write logs and checkpoints once, and resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # every test launches torchrun or accelerate subprocesses

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
SETTINGS = ["--train-limit", "8", "--max-steps", "3", "--cutoff", "96", "--save-steps", "2", "--lr", "0.001"]


def _train(model_dir, out, batch_size, launcher=TORCHRUN, extra=(), adapter=""):
    config = out.parent / f"{out.name}.yaml"
    config.write_text("adapter:\n  r: 4\n  lora_dropout: 0.0\n" + adapter)
    command = [
        *launcher,
        "-m",
        "comoe.cli",
        "train",
        "--model",
        str(model_dir),
        *SETTINGS,
        "--batch-size",
        str(batch_size),
        "--output",
        str(out),
        "--config",
        str(config),
        *extra,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "adapter" / "adapter_model.safetensors")


# The comoe preset (CoMoE loss, weighted per token), and load balancing counted over the global batch.
BALANCE = "  contrastive: none\n  balance_weight: 0.5\n  balance_scope: global\n"


@pytest.mark.parametrize("adapter", ["", BALANCE], ids=["comoe", "global-balance"])
def test_torchrun_ddp_equals_one_process_with_the_global_batch(tiny_model_dir, tmp_path, adapter):
    single = _train(tiny_model_dir, tmp_path / "single", 4, launcher=(sys.executable,), adapter=adapter)
    ddp = _train(tiny_model_dir, tmp_path / "ddp", 2, adapter=adapter)
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-6, msg=key)
    assert (tmp_path / "ddp" / "checkpoints" / "step-000002").is_dir()
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(log) == 3  # written once, by the main process


def test_ddp_resume_from_a_checkpoint(tiny_model_dir, tmp_path):
    straight = _train(tiny_model_dir, tmp_path / "straight", 2)
    run = tmp_path / "resumed"
    _train(tiny_model_dir, run, 2)
    shutil.rmtree(run / "adapter")  # as if killed after the step-2 checkpoint
    resumed = _train(tiny_model_dir, run, 2, extra=("--resume",))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_fsdp_trains_saves_and_reloads_in_one_process(tiny_model_dir, tmp_path):
    from comoe import ComoeModel
    from comoe.models import load_base

    single = _train(tiny_model_dir, tmp_path / "single", 4, launcher=(sys.executable,))
    sharded = _train(tiny_model_dir, tmp_path / "fsdp", 2, extra=("--fsdp",))
    for key in single:  # FSDP averages gradients like DDP: the same adapter as one process
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-4, atol=1e-6, msg=key)
    base, _ = load_base(str(tiny_model_dir))
    model = ComoeModel.from_pretrained(base, tmp_path / "fsdp" / "adapter")
    assert torch.equal(
        model.adapter_state_dict()["model.layers.0.self_attn.q_proj.lora_B"],
        sharded["model.layers.0.self_attn.q_proj.lora_B"],
    )


def test_accelerate_launch_equals_one_process(tiny_model_dir, tmp_path):
    accelerate = (
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    )
    single = _train(tiny_model_dir, tmp_path / "single", 4, launcher=(sys.executable,))
    launched = _train(tiny_model_dir, tmp_path / "accelerate", 2, launcher=accelerate)
    for key in single:
        torch.testing.assert_close(launched[key], single[key], rtol=1e-4, atol=1e-6, msg=key)
