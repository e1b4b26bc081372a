"""Writing the adapter folder (adapter_config.json + adapter_model.safetensors, atomically) and its tensors.

The file names are PEFT's, so a folder reads like a PEFT adapter; `adapter_type: "comoe"` and
`format_version` tell comoe's apart. Reading a folder's config is comoe.adapter.folder's (AdapterFolder),
whose names are also importable from here. Tensors are read from safetensors only (nothing is unpickled),
and a missing, truncated or corrupt weights file, or weights of another model, is an error that names it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from comoe.adapter.folder import (  # the reading side, importable from here as before
    ADAPTER_TYPE,
    CONFIG_NAME,
    FORMAT_VERSION,
    PROVENANCE_KEYS,
    WEIGHTS_NAME,
    AdapterFolder,
    adapter_kind,
    base_model_of,
    load_config,
    read_config_json,
)
from comoe.config import ComoeConfig
from comoe.errors import AdapterMismatch
from comoe.files import atomic_save_safetensors, atomic_write_text

__all__ = [
    "ADAPTER_TYPE",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "PROVENANCE_KEYS",
    "WEIGHTS_NAME",
    "AdapterFolder",
    "adapter_kind",
    "assign_weights",
    "base_model_of",
    "check_fits",
    "comoe_version",
    "full_tensor",
    "load_config",
    "load_weights_into",
    "read_config_json",
    "read_safetensors",
    "save_config",
    "save_weights",
    "tensor_shapes",
]


def save_config(
    config: ComoeConfig, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> None:
    provenance = {"base_model_name_or_path": base_model_name_or_path, "comoe_version": comoe_version()}
    payload = {"adapter_type": ADAPTER_TYPE, "format_version": FORMAT_VERSION, **provenance}
    payload.update(config.to_dict())
    atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")


def comoe_version() -> str:
    """The installed comoe's version (from its package metadata)."""
    try:
        return importlib.metadata.version("comoe")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter gathered whole; other tensors as they are. Collective for DTensors."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def save_weights(tensors: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    atomic_save_safetensors(Path(directory) / WEIGHTS_NAME, tensors, {"format": "pt"})


@contextlib.contextmanager
def _reading_safetensors(path: str | os.PathLike) -> Iterator[None]:
    """One clear error for a missing, truncated or corrupt safetensors file, whatever reads it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: adapter weights not found")
    try:
        yield
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated or corrupted?): {error}"
        ) from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file."""
    with _reading_safetensors(path):
        return load_file(path)


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file from its header, without reading (or allocating) tensors."""
    with _reading_safetensors(path), safe_open(path, framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


def check_fits(
    expected: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]], path: str | os.PathLike
) -> None:
    """Refuse a weights file whose tensor names or shapes differ from what the model expects
    (AdapterMismatch, a ValueError): one line naming a few tensors of each kind of difference ("and N more"
    for the rest), and that either the config disagrees with the weights (its method fields decide the
    tensors: expert_bank 'dora' adds lora_magnitude_vector, num_experts and r their shapes) or the weights
    are of another base model. The error's `differences` lists every difference, one string each."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = [
        f"{k}: saved {tuple(saved[k])}, model {tuple(expected[k])}"
        for k in sorted(set(saved) & set(expected))
        if tuple(saved[k]) != tuple(expected[k])
    ]
    if missing or unexpected or wrong:
        kinds = [("missing in file", missing), ("not in model", unexpected), ("shape mismatch", wrong)]
        summary = "; ".join(f"{kind}: {_first_few(items)}" for kind, items in kinds if items)
        raise AdapterMismatch(
            f"{path} does not fit the adapter its config describes on this base model ({summary}): the "
            "config's method fields (expert_bank, num_experts, r, target_modules, ...) may disagree with the "
            "file's tensors, or the weights are of another base model",
            [f"{kind} {item}" for kind, items in kinds for item in items],
        )


def _first_few(items: list[str], shown: int = 3) -> str:
    """`items` as one phrase: the first `shown`, then "and N more"; a missing or unexpected tensor's kind
    (its last name, e.g. lora_magnitude_vector) is said once for all when they share it."""
    names = {item.split(":")[0].rsplit(".", 1)[-1] for item in items}
    kind = f"{len(items)} x {names.pop()}: " if len(names) == 1 and len(items) > 1 else ""
    more = f", and {len(items) - shown} more" if len(items) > shown else ""
    return kind + ", ".join(items[:shown]) + more


def assign_weights(
    expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], path: str | os.PathLike
) -> None:
    """Copy `saved` into the parameters `expected` (name -> parameter) after checking that they fit."""
    check_fits(
        {k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in saved.items()}, path
    )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(saved[key])


def load_weights_into(expected: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load a safetensors file into the parameters `expected` (name -> parameter); they must fit exactly."""
    assign_weights(expected, read_safetensors(path), path)
