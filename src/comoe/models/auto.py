"""Base model and adapter from an adapter folder alone (the base model's name is recorded in the folder), and
the check that an adapter runs on the base it was trained on."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from comoe.adapter.auto import load_adapter
from comoe.adapter.folder import AdapterFolder, adapter_folder
from comoe.errors import AdapterMismatch
from comoe.models.loading import load_base, same_model

logger = logging.getLogger(__name__)

# The base model of a command given neither --model nor an adapter folder that records one.
DEFAULT_BASE = "smollm2-135m"


def base_model_name(model: str | None, folder: AdapterFolder | None) -> str:
    """The base model to load: `model` when given, else the one the adapter folder records, else
    smollm2-135m."""
    recorded = folder.base_model_name_or_path if folder is not None else None
    return model or recorded or DEFAULT_BASE


def load_adapted(
    folder: AdapterFolder | None,
    model: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    device: torch.device | str | None = None,
    is_trainable: bool = False,
) -> tuple[nn.Module, Any]:
    """The base model (base_model_name) with the adapter folder applied when there is one, and its tokenizer.

    Without `model`, the adapter runs on the base it records (as PEFT's AutoPeftModel does). A `model` other
    than the recorded one is named in a warning when the adapter fits it (same shapes, other weights?) and
    refused, naming the recorded base, when it does not (AdapterMismatch, one line).
    """
    recorded = folder.base_model_name_or_path if folder is not None else None
    name = base_model_name(model, folder)
    try:
        base, tokenizer = load_base(name, dtype=dtype, quantization=quantization, device=device)
    except FileNotFoundError as error:
        if folder is None or model is not None or recorded is None:
            raise
        raise FileNotFoundError(
            f"{folder.path} was trained on base model {recorded}, which is not here ({error}); give --model"
        ) from None
    if folder is None:
        return base, tokenizer
    return adapt_base(base, folder, model, is_trainable=is_trainable), tokenizer


def adapt_base(
    base: nn.Module, folder: AdapterFolder, model: str | None = None, *, is_trainable: bool = False
) -> nn.Module:
    """A loaded base model (base_model_name(model, folder)) with the adapter folder applied, checked as
    load_adapted checks it: a base other than the recorded one is named in a warning when the adapter fits
    it, and refused naming the recorded base when not. Several adapters can take turns on one loaded base
    (`unload()` gives it back)."""
    recorded = folder.base_model_name_or_path
    name = base_model_name(model, folder)
    try:
        adapted = load_adapter(base, folder, is_trainable=is_trainable)
    except AdapterMismatch as error:
        raise AdapterMismatch(_mismatch(folder, name, model, recorded, error)) from None
    if model is not None and recorded is not None and not same_model(model, recorded):
        logger.warning(
            "%s was trained on base model %s; running it on %s, whose shapes fit it "
            "(leave out --model to use the recorded base)",
            folder.path,
            recorded,
            name,
        )
    return adapted


def _mismatch(
    folder: AdapterFolder, name: str, model: str | None, recorded: str | None, error: AdapterMismatch
) -> str:
    """On a base other than the recorded one: one line naming both and the first difference. Otherwise
    (the recorded base, or none recorded) the error itself, then the base it was tried on."""
    if recorded is None:
        default = (
            "" if model is not None else ", the default: the adapter records no base model; give --model"
        )
        return f"{error} (the base model is {name}{default})"
    if same_model(name, recorded):  # the folder disagrees with its own base (edited, or the base changed)
        return f"{error} (the base model is {recorded}, the one the adapter records)"
    # comoe's error lists every differing tensor in `differences`; PEFT's is one line
    differences = error.differences
    summary = str(error).removeprefix(f"{folder.path}: ")
    if differences:
        summary = differences[0] + (f", and {len(differences) - 1} more" if len(differences) > 1 else "")
    return (
        f"{folder.path} was trained on base model {recorded}, and {name} does not fit it ({summary}); "
        f"leave out --model to use {recorded}"
    )


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
        recorded name (a moved or renamed base; another one that fits is named in a warning). `directory`
        is a path or the AdapterFolder read from it; the folder is checked before the base model is
        loaded."""
        folder = adapter_folder(directory)
        if base_model is None and folder.base_model_name_or_path is None:
            raise ValueError(
                f"{folder.path}: the adapter does not record its base model (base_model_name_or_path); "
                "pass base_model=..."
            )
        return load_adapted(folder, base_model, is_trainable=is_trainable)[0]
