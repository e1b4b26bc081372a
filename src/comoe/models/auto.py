"""Base model and adapter from an adapter folder alone (the base model's name is recorded in the folder)."""

from __future__ import annotations

import os

from torch import nn

from comoe.adapter.auto import load_adapter
from comoe.adapter.folder import AdapterFolder, adapter_folder
from comoe.models.loading import load_base


class AutoComoeModelForCausalLM:
    """Base model + adapter from an adapter folder alone, as PEFT's AutoPeftModelForCausalLM: the folder's
    adapter_config.json names the base model (base_model_name_or_path), which is loaded as `comoe train
    --model` loads it (a built-in alias, a local folder, or a hub id)."""

    @classmethod
    def from_pretrained(
        cls,
        directory: AdapterFolder | str | os.PathLike,
        base_model: str | None = None,
        is_trainable: bool = False,
    ) -> nn.Module:
        """The adapted model, frozen and in eval mode unless `is_trainable`; `base_model` overrides the
        recorded name (a moved or renamed base). `directory` is a path or the AdapterFolder read from it;
        the folder is checked before the base model is loaded."""
        folder = adapter_folder(directory)
        name = base_model or folder.base_model_name_or_path
        if name is None:
            raise ValueError(
                f"{folder.path}: the adapter does not record its base model (base_model_name_or_path); "
                "pass base_model=..."
            )
        base, _ = load_base(name)
        return load_adapter(base, folder, is_trainable=is_trainable)
