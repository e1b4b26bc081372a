"""Modules trained in full beside the experts and saved with the adapter (`modules_to_save`), as PEFT's
ModulesToSaveWrapper does: e.g. the new classification head of a sequence-classification model, which
would otherwise stay at its random initialisation, frozen."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from comoe.adapter.layer import ComoeContext


class TrainedCopy(nn.Module):
    """The original module (frozen, used while adapters are disabled) and a trainable copy of it (used
    otherwise, and saved with the adapter under `<path>.trained_module.*`)."""

    def __init__(self, original: nn.Module, context: ComoeContext) -> None:
        super().__init__()
        self.original_module = original
        self.trained_module = copy.deepcopy(original)
        for param in self.trained_module.parameters():
            param.requires_grad_(True)
        self.context = context

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.trained_module if self.context.adapters_enabled else self.original_module
        return module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # .weight, .out_features, ...: those of the trained copy
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.trained_module, name)
