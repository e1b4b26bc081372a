"""Where a command's model runs: `--device auto` picks the GPU when torch sees one, else the CPU.

The settings only check the spelling (comoe.validation.check_device, no torch); this module resolves the
name against what this machine has, so a run asked to use a GPU that is not there stops with one line
saying what is available, instead of silently training on the CPU for hours. Under torchrun / accelerate
launch each process takes its own GPU, LOCAL_RANK.
"""

from __future__ import annotations

import os

import torch


def available_devices() -> list[str]:
    """The device names this machine can run on, for error messages."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str) -> torch.device:
    """'auto' -> this process's GPU if there is one (cuda:LOCAL_RANK), else mps, else cpu; 'cuda' ->
    cuda:LOCAL_RANK; an explicit device is checked to exist here."""
    asked = name
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            return torch.device("cpu")
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or device.index >= torch.cuda.device_count()):
        raise ValueError(
            f"device={asked!r}: torch {torch.__version__} sees no such GPU here; valid: "
            + ", ".join(available_devices())
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={asked!r}: no MPS device here; valid: " + ", ".join(available_devices()))
    return device
