"""An adapter folder read once: `AdapterFolder.read(path)` reads and checks adapter_config.json and finds
the weights file, and the frozen result is what loading passes down (evaluation, AutoComoeModelForCausalLM,
lm-eval, `load_adapter`), so that no step reads the config again.

The folder's layout is PEFT's (adapter_config.json + adapter_model.safetensors); `adapter_type: "comoe"`
and `format_version` tell comoe's apart. Every way the config can be wrong (missing, bad JSON, unknown or
invalid fields, another format version) is an error that names the file. Writing a folder, and reading
its tensors, is comoe.adapter.serialization's job.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from comoe.config import ComoeConfig
from comoe.files import read_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
ADAPTER_TYPE = "comoe"

# Keys of adapter_config.json that describe the folder rather than configure the adapter.
PROVENANCE_KEYS = ("base_model_name_or_path", "comoe_version")


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    """The raw adapter_config.json of a folder (comoe or PEFT), with a clear error when absent or broken."""
    path = Path(directory) / CONFIG_NAME
    values = read_json(path, "no adapter config here (is this an adapter folder?)")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of settings")
    return values


def config_from_json(values: dict[str, Any], path: Path) -> ComoeConfig:
    """The ComoeConfig of a comoe adapter_config.json's values (read from `path`), every field validated."""
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
    if "norm_topk_prob" not in values:  # written before the field: top-k gates were always renormalised
        values["norm_topk_prob"] = True if values.get("top_k") == 1 else None
    try:
        return ComoeConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None


@dataclass(frozen=True)
class AdapterFolder:
    """An adapter folder (comoe's or PEFT's) whose adapter_config.json was read once and checked, and
    whose weights file exists. It is an os.PathLike of the folder, so it goes wherever a path does."""

    path: Path
    kind: Literal["comoe", "peft"]
    # The comoe adapter's settings, every field validated (None for a PEFT folder).
    config: ComoeConfig | None
    # The base model the adapter was trained on, as recorded (comoe and PEFT both write it), or None.
    base_model_name_or_path: str | None
    weights: Path
    # adapter_config.json as read (a read-only view).
    values: MappingProxyType[str, Any]

    @classmethod
    def read(cls, directory: str | os.PathLike) -> AdapterFolder:
        """Read and check `directory`: its adapter_config.json (once), the weights file, and, for comoe,
        every config field; each failure names the file. Cheap: callers read before loading a base model."""
        path = Path(directory)
        values = read_config_json(path)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: adapter weights not found")
        comoe = values.get("adapter_type") == ADAPTER_TYPE
        config = config_from_json(values, path / CONFIG_NAME) if comoe else None
        base = values.get("base_model_name_or_path")
        return cls(
            path=path,
            kind="comoe" if comoe else "peft",
            config=config,
            base_model_name_or_path=base if isinstance(base, str) and base else None,
            weights=weights,
            values=MappingProxyType(values),
        )

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    def comoe_config(self) -> ComoeConfig:
        """A copy of the ComoeConfig (a model built from it may change its own); for a PEFT folder, the
        error that loading it as comoe's has always given."""
        if self.config is None:
            return config_from_json(dict(self.values), self.config_path)  # raises: not a comoe config
        return copy.deepcopy(self.config)

    def __fspath__(self) -> str:
        return os.fspath(self.path)


def adapter_folder(source: AdapterFolder | str | os.PathLike) -> AdapterFolder:
    """`source` itself when it is an AdapterFolder already, else the folder at that path, read."""
    return source if isinstance(source, AdapterFolder) else AdapterFolder.read(source)


def load_config(directory: AdapterFolder | str | os.PathLike) -> ComoeConfig:
    """The ComoeConfig of a comoe adapter folder, every field validated."""
    return adapter_folder(directory).comoe_config()


def base_model_of(directory: AdapterFolder | str | os.PathLike) -> str | None:
    """The base model an adapter folder was trained on, as recorded in its adapter_config.json (comoe and
    PEFT both write base_model_name_or_path), or None."""
    return adapter_folder(directory).base_model_name_or_path


def adapter_kind(directory: AdapterFolder | str | os.PathLike) -> str:
    """'comoe' or 'peft' for an adapter folder, after checking that both files are there (and, for comoe,
    that every config field is valid): cheap, so callers check before loading a base model."""
    return adapter_folder(directory).kind
