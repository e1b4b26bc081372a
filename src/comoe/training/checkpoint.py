"""Checkpoints: checkpoints/step-N/ with the adapter, optimizer moments, scheduler and RNG state.

Safetensors and JSON only (nothing is unpickled), each file written atomically and the folder renamed into
place whole, so a kill at any moment leaves the previous checkpoint intact and resume is exact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comoe.adapter.method import method_of, save_adapter
from comoe.adapter.serialization import WEIGHTS_NAME, read_safetensors
from comoe.files import atomic_save_safetensors, atomic_write_text, read_json

logger = logging.getLogger(__name__)


def save_checkpoint(run: Path, step: int, model: nn.Module, optimizer, scheduler) -> None:
    """checkpoints/step-N/: adapter, optimizer moments, scheduler and RNG state; renamed into place whole."""
    root = run / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp / "adapter")
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value for index, slots in state["state"].items() for key, value in slots.items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_initialized():  # dropout on the GPU draws from its own generator
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
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


@dataclass
class SavedCheckpoint:
    """Every file of a checkpoint read and checked, before anything is loaded into the model."""

    path: Path
    step: int
    meta: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]


def read_checkpoint(checkpoint: Path) -> SavedCheckpoint:
    """Read a checkpoint whole; ValueError (naming the file) if any part is missing, truncated or corrupt."""
    meta = read_json(checkpoint / "trainer_state.json", "checkpoint without trainer_state.json")
    fields = {"step": int, "param_groups": list, "scheduler": dict}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in fields.items()):
        raise ValueError(
            f"{checkpoint / 'trainer_state.json'}: expected {sorted(fields)} as a run writes them"
        )
    optimizer = read_safetensors(checkpoint / "optimizer.safetensors")
    if "rng.torch" not in optimizer:
        raise ValueError(f"{checkpoint / 'optimizer.safetensors'}: no RNG state (rng.torch)")
    adapter = read_safetensors(checkpoint / "adapter" / WEIGHTS_NAME)
    return SavedCheckpoint(checkpoint, meta["step"], meta, adapter, optimizer)


def load_checkpoint(run: Path, model: nn.Module, optimizer, scheduler) -> int:
    """Restore the newest intact checkpoint of `run` into model, optimizer, scheduler and RNG; returns its
    step. A checkpoint that cannot be read whole is skipped, saying so, for the one before it."""
    found = sorted((run / "checkpoints").glob("step-*"), reverse=True)
    if not found:
        logger.warning(f"--resume: no checkpoint in {run / 'checkpoints'} yet, starting at step 0")
        return 0
    for checkpoint in found:
        try:
            saved = read_checkpoint(checkpoint)
        except (ValueError, OSError) as error:
            logger.warning(f"--resume: skipping {checkpoint.name}, which is unreadable ({error})")
            continue
        _restore(saved, model, optimizer, scheduler)
        logger.info(f"resumed from {checkpoint} (step {saved.step})")
        return saved.step
    raise ValueError(f"--resume: none of the {len(found)} checkpoints in {run / 'checkpoints'} is intact")


def _restore(saved: SavedCheckpoint, model: nn.Module, optimizer, scheduler) -> None:
    method = method_of(model)
    if method is None:
        raise TypeError(f"{type(model).__name__} carries no adapter to restore {saved.path} into")
    method.load_adapter_state(model, saved.adapter, str(saved.path / "adapter" / WEIGHTS_NAME))
    tensors = dict(saved.optimizer)
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = optimizer.state_dict()["param_groups"]
    for group, previous in zip(groups, saved.meta["param_groups"], strict=True):
        group.update(previous)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    scheduler.load_state_dict({**scheduler.state_dict(), **saved.meta["scheduler"]})
