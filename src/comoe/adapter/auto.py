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
    return PeftModel.from_pretrained(base, directory).eval()
