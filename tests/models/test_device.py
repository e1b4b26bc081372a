"""--device: 'auto' takes this process's GPU when torch sees one, an absent GPU is a one-line error, and the
commands put the model where the setting says (checked by sending it to the meta device)."""

from __future__ import annotations

import pytest
import torch

from comoe.analysis.metrics import _count_pairs
from comoe.evaluation import runner
from comoe.models import device as device_module
from comoe.models.device import resolve_device
from comoe.training import factory
from comoe.training.settings import TrainArgs


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize(("local_rank", "expected"), [(None, "cuda:0"), ("1", "cuda:1")])
def test_auto_and_cuda_take_this_process_gpu(monkeypatch, local_rank, expected):
    fake_gpus(monkeypatch, 2)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cuda") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("gpus", "name"), [(0, "cuda"), (0, "cuda:0"), (2, "cuda:2")])
def test_a_gpu_that_is_not_there_is_an_error_listing_what_is(monkeypatch, gpus, name):
    fake_gpus(monkeypatch, gpus)
    valid = "cpu" if gpus == 0 else "cpu, cuda, cuda:0, cuda:1"
    with pytest.raises(ValueError, match=rf"device='{name}': .* sees no such GPU here; valid: {valid}$"):
        resolve_device(name)


def test_mps_without_mps_is_an_error(monkeypatch):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="device='mps': no MPS device here; valid: cpu"):
        device_module.resolve_device("mps")


def to_meta(name: str) -> torch.device:
    return torch.device("meta")


@pytest.mark.parametrize("preset", ["comoe", "lora"])
def test_training_builds_the_model_on_the_resolved_device(monkeypatch, tiny_model_dir, preset):
    monkeypatch.setattr(factory, "resolve_device", to_meta)
    model, _ = factory.build_model(TrainArgs(model=str(tiny_model_dir), preset=preset, device="cuda"))
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    assert devices == {"meta"}


def test_evaluation_loads_the_model_on_the_resolved_device(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(runner, "resolve_device", to_meta)
    model, _ = runner.load_for_eval(str(tiny_model_dir), None, "bfloat16", "cuda")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_routing_counts_from_the_gpu_add_into_tables_kept_elsewhere():
    """Routing statistics keep their count tables on the CPU while a GPU run's routing lives on the GPU:
    the counts are moved to the table (a meta table stands in for the other device)."""
    table = torch.zeros(2, 4, dtype=torch.float64, device="meta")
    _count_pairs(table, torch.tensor([0, 1, 1]), torch.tensor([[0, 1], [2, 3], [3, 0]]))
    cpu = torch.zeros(2, 4, dtype=torch.float64)
    _count_pairs(cpu, torch.tensor([0, 1, 1]), torch.tensor([[0, 1], [2, 3], [3, 0]]))
    assert cpu.tolist() == [[1, 1, 0, 0], [1, 0, 1, 2]]
