"""An adapter folder of either kind applied to a base model: comoe's own, or PEFT's (the LoRA baseline)."""

from __future__ import annotations

import os

from peft import PeftModel
from torch import nn

from comoe.adapter.folder import AdapterFolder, adapter_folder
from comoe.adapter.model import ComoeModel
from comoe.errors import AdapterMismatch


def load_adapter(
    base: nn.Module, directory: AdapterFolder | str | os.PathLike, is_trainable: bool = False
) -> nn.Module:
    """`base` wrapped with the adapter in `directory` (a path, or the AdapterFolder read from it), frozen
    and in eval mode unless `is_trainable`. Weights of another base model (other shapes or modules) raise
    AdapterMismatch, listing what differs; an unreadable weights file raises ValueError as itself."""
    folder = adapter_folder(directory)
    if folder.kind == "comoe":  # from_pretrained checks the file's shapes: AdapterMismatch when they differ
        return ComoeModel.from_pretrained(base, folder, is_trainable=is_trainable)  # not read again
    try:
        model = PeftModel.from_pretrained(base, os.fspath(folder.path), is_trainable=is_trainable)
    except (RuntimeError, KeyError, ValueError) as error:  # size mismatches, modules the base lacks
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        reason = next((line for line in lines if "mismatch" in line), lines[0] if lines else repr(error))
        raise AdapterMismatch(
            f"{folder.path}: this PEFT adapter does not fit the base model ({reason})"
        ) from None
    return model if is_trainable else model.eval()
