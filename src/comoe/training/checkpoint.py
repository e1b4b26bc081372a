"""Checkpoints: checkpoints/step-N/ with the adapter, optimizer moments, scheduler and RNG state.

Safetensors and JSON only (nothing is unpickled), each file written atomically and the folder renamed into
place whole, so a kill at any moment leaves the previous checkpoint intact and resume is exact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from comoe.adapter.model import ComoeModel
from comoe.adapter.serialization import WEIGHTS_NAME, read_safetensors
from comoe.files import atomic_save_safetensors, atomic_write_text, read_json


def save_checkpoint(run: Path, step: int, model: nn.Module, optimizer, scheduler) -> None:
    """checkpoints/step-N/: adapter, optimizer moments, scheduler and RNG state; renamed into place whole."""
    root = run / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "adapter")
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value for index, slots in state["state"].items() for key, value in slots.items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_save_safetensors(tmp / "optimizer.safetensors", tensors)
    groups = [{k: v for k, v in group.items() if k != "params"} for group in state["param_groups"]]
    meta = {"step": step, "param_groups": groups, "scheduler": _json_safe(scheduler.state_dict())}
    atomic_write_text(tmp / "trainer_state.json", json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _json_safe(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if isinstance(v, int | float | str | list | bool | type(None))}


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted((run / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(run: Path, model: nn.Module, optimizer, scheduler) -> int:
    """Restore the last checkpoint of `run` into model, optimizer, scheduler and RNG; returns its step."""
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        print(f"--resume: no checkpoint in {run / 'checkpoints'} yet, starting at step 0")
        return 0
    meta = read_json(checkpoint / "trainer_state.json", "checkpoint without trainer_state.json")
    _load_adapter_weights(model, checkpoint / "adapter")
    tensors = load_file(checkpoint / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = optimizer.state_dict()["param_groups"]
    for group, saved in zip(groups, meta["param_groups"], strict=True):
        group.update(saved)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    print(f"resumed from {checkpoint} (step {meta['step']})")
    return int(meta["step"])


def _load_adapter_weights(model: nn.Module, directory: Path) -> None:
    if isinstance(model, ComoeModel):
        model.load_adapter_weights(directory / WEIGHTS_NAME)
        return
    set_peft_model_state_dict(model, read_safetensors(directory / WEIGHTS_NAME))
