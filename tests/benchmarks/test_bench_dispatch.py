"""benchmarks/bench_dispatch.py's counts on the tiny Llama: the eager dispatch targets of the GPU-speed
work (ops per adapted layer, forward + backward, against PEFT LoRA matched to the comoe preset's trainable
parameters) and no host sync in any preset's training step. Counts, not timings: deterministic."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_dispatch  # noqa: E402  (a script folder, not a package)

TARGETS = {"moe": 2.0, "comoe": 3.0, "moelora": 4.0}  # at most this many times PEFT LoRA's ops per layer


@pytest.fixture(scope="module")
def counts():
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    return bench_dispatch.measure("tiny-llama", bench_dispatch.tiny_llama, ids, list(TARGETS))["methods"]


@pytest.mark.parametrize("preset", list(TARGETS))
def test_ops_per_adapted_layer_meet_the_eager_target(counts, preset):
    lora = counts["peft-lora"]["train"]["ops_per_layer"]
    ops = counts[preset]["train"]["ops_per_layer"]
    assert lora > 0 and counts[preset]["adapted_layers"] == 16
    assert ops <= TARGETS[preset] * lora, f"{preset}: {ops:.1f} ops per layer, LoRA {lora:.1f}"


@pytest.mark.parametrize("preset", list(TARGETS))
def test_no_host_sync_in_a_training_step_or_an_inference_forward(counts, preset):
    for mode in ("train", "inference"):
        assert counts[preset][mode]["syncs"] == counts["base"][mode]["syncs"]
