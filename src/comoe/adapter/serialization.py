"""The adapter folder format: adapter_config.json + adapter_model.safetensors, written atomically.

The file names are PEFT's, so a folder reads like a PEFT adapter; `adapter_type: "comoe"` and
`format_version` tell comoe's apart. Tensors are read from safetensors only (nothing is unpickled), and
every way a folder can be wrong (missing file, bad JSON, unknown fields, weights of another model) is an
error that names the file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from comoe.config import ComoeConfig
from comoe.files import atomic_save_safetensors, atomic_write_text, read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
ADAPTER_TYPE = "comoe"


# Keys of adapter_config.json that describe the folder rather than configure the adapter.
PROVENANCE_KEYS = ("base_model_name_or_path", "comoe_version")


def save_config(
    config: ComoeConfig, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> None:
    provenance = {"base_model_name_or_path": base_model_name_or_path, "comoe_version": comoe_version()}
    payload = {"adapter_type": ADAPTER_TYPE, "format_version": FORMAT_VERSION, **provenance}
    payload.update(config.to_dict())
    atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    """The raw adapter_config.json of a folder (comoe or PEFT), with a clear error when absent or broken."""
    path = Path(directory) / CONFIG_NAME
    values = read_json(path, "no adapter config here (is this an adapter folder?)")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of settings")
    return values


def load_config(directory: str | os.PathLike) -> ComoeConfig:
    """The ComoeConfig of a comoe adapter folder, every field validated."""
    return _config_from_json(read_config_json(directory), Path(directory) / CONFIG_NAME)


def _config_from_json(values: dict[str, Any], path: Path) -> ComoeConfig:
    values = dict(values)
    if values.pop("adapter_type", None) != ADAPTER_TYPE:
        raise ValueError(f"{path}: not a comoe adapter config (adapter_type must be 'comoe')")
    for key in PROVENANCE_KEYS:
        values.pop(key, None)
    version = values.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r} is not supported (this comoe reads {FORMAT_VERSION})"
        )
    try:
        return ComoeConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None


def comoe_version() -> str:
    """The installed comoe's version (from its package metadata)."""
    try:
        return importlib.metadata.version("comoe")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def base_model_of(directory: str | os.PathLike) -> str | None:
    """The base model an adapter folder was trained on, as recorded in its adapter_config.json (comoe and
    PEFT both write base_model_name_or_path), or None."""
    value = read_config_json(directory).get("base_model_name_or_path")
    return value if isinstance(value, str) and value else None


def adapter_kind(directory: str | os.PathLike) -> str:
    """'comoe' or 'peft' for an adapter folder, after checking that both files are there (and, for comoe,
    that every config field is valid): cheap, so callers check before loading a base model."""
    weights = Path(directory) / WEIGHTS_NAME
    values = read_config_json(directory)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: adapter weights not found")
    if values.get("adapter_type") == ADAPTER_TYPE:
        _config_from_json(values, Path(directory) / CONFIG_NAME)  # validates every field
        return "comoe"
    return "peft"


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
    """Refuse a weights file whose tensor names or shapes differ from what the model expects, listing them."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = [
        f"{k}: saved {tuple(saved[k])}, model {tuple(expected[k])}"
        for k in sorted(set(saved) & set(expected))
        if tuple(saved[k]) != tuple(expected[k])
    ]
    if missing or unexpected or wrong:
        lines = [f"{path} does not fit this base model"]
        lines += [f"  missing in file: {k}" for k in missing[:20]]
        lines += [f"  not in model: {k}" for k in unexpected[:20]]
        lines += [f"  shape mismatch {w}" for w in wrong[:20]]
        raise ValueError("\n".join(lines))


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
