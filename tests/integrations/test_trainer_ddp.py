"""transformers Trainer under DDP (two CPU processes, gloo): the auxiliary losses keep their weight, so
two processes with half the batch each take the step of one process with the whole batch. Trainer
normalises the task loss by the token count of every process and multiplies it by the process count;
an auxiliary loss added as-is would be counted twice."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # launches torchrun

WORKER = Path(__file__).with_name("trainer_ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def run(folder: Path, launcher: tuple, batch: int, trainer: str, smoothing: float) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*launcher, str(WORKER), str(folder), str(batch), trainer, str(smoothing)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(folder / "adapter.safetensors")


@pytest.mark.parametrize(
    "trainer, smoothing", [("Trainer", 0.0), ("ComoeTrainer", 0.1)], ids=["model-loss", "label-smoothing"]
)
def test_two_processes_take_the_one_process_step(tmp_path, trainer, smoothing):
    single = run(tmp_path / "single", (sys.executable,), 4, trainer, smoothing)
    ddp = run(tmp_path / "ddp", TORCHRUN, 2, trainer, smoothing)
    assert single.keys() == ddp.keys()
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
