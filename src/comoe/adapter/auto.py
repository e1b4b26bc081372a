"""An adapter folder of either kind applied to a base model: comoe's own, or PEFT's (the LoRA baseline)."""

from __future__ import annotations

import os

from peft import PeftModel
from torch import nn

from comoe.adapter.model import ComoeModel
from comoe.adapter.serialization import adapter_kind


def load_adapter(base: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """`base` wrapped with the adapter in `directory`, frozen and in eval mode."""
    if adapter_kind(directory) == "comoe":
        return ComoeModel.from_pretrained(base, directory)
    try:
        return PeftModel.from_pretrained(base, directory).eval()
    except (RuntimeError, KeyError, ValueError) as error:  # size mismatches, modules the base lacks
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        reason = next((line for line in lines if "mismatch" in line), lines[0] if lines else repr(error))
        raise ValueError(f"{directory}: this PEFT adapter does not fit the base model ({reason})") from None
