"""One loader for every command's settings: dataclass defaults, then a YAML file, then command-line flags.

`comoe train`, `comoe eval`, `comoe analyze` and `comoe demo` each describe their settings as a dataclass
whose fields carry their help text (and, where they have them, their choices) in `metadata`. This module
turns such a dataclass into command-line flags and builds it from a YAML file plus flags, with one
unknown-key check. Pure Python and PyYAML: the command line's --help must not load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from comoe.validation import InvalidSetting, check_choice, check_device, check_type, fail, reject_unknown

DTYPES = ("float32", "bfloat16", "float16")  # the base model's dtype (--dtype)
DEVICE_HELP = "where the model runs: auto (the GPU when torch sees one, else the CPU), cpu, cuda, cuda:N, mps"

S = TypeVar("S")


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field that carries its help text (and e.g. `choices`, `flag=False`) for the CLI."""
    if isinstance(default, list | dict):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help, **metadata}
        )
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def check_placement(settings: Any) -> None:
    """The --dtype and --device of a command that loads a model (train, eval, analyze, generate), and its
    --load-in-4bit / --load-in-8bit where it has them (exclusive)."""
    check_choice("dtype", settings.dtype, DTYPES)
    check_device("device", settings.device)
    for name in QUANTIZATION_FLAGS.values():
        if hasattr(settings, name):
            check_type(name, getattr(settings, name), "bool | None")
    if sum(bool(getattr(settings, name, None)) for name in QUANTIZATION_FLAGS.values()) > 1:
        raise ValueError(
            "load_in_4bit and load_in_8bit are exclusive: the base is quantized to 4-bit NF4 or to 8-bit, "
            "give one of them"
        )


# A quantized base (comoe.models.quantization): its name -> the setting (flag) that asks for it.
QUANTIZATION_FLAGS = {"4bit": "load_in_4bit", "8bit": "load_in_8bit"}
LOAD_IN_4BIT_HELP = (
    "load the base's linears quantized to 4-bit NF4 with bitsandbytes (QLoRA: double quantisation, "
    "bfloat16 compute, float16 under --dtype float16)"
)
LOAD_IN_8BIT_HELP = "load the base's linears quantized to 8-bit with bitsandbytes (LLM.int8, float16 compute)"
RECORDED_QUANTIZATION_HELP = " (default: as the adapter was trained, recorded in its folder)"


def quantization_of(settings: Any) -> str | None:
    """'4bit' or '8bit' where the settings ask for a quantized base, else None."""
    return next((kind for kind, name in QUANTIZATION_FLAGS.items() if getattr(settings, name, None)), None)


def quantization_unset(settings: Any) -> bool:
    """Neither quantization setting given, not even as false (then an adapter's record decides)."""
    return all(getattr(settings, name, None) is None for name in QUANTIZATION_FLAGS.values())


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of settings (safe loader: no Python objects), keys with '-' spelled as '_'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if loaded is None:  # an empty file (or only comments) is more likely a wrong path than "all defaults"
        raise ValueError(
            f"--config {path}: no settings in the file (it is empty or only comments); expected a mapping of "
            "settings, e.g. 'lr: 0.0002'"
        )
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def load_settings(cls: type[S], config_file: str | Path | None, overrides: dict[str, Any]) -> S:
    """Defaults of `cls`, then the YAML file, then explicit overrides (flags; None means not given).

    An invalid value from the file is reported with the file's name; one from a flag, with the flag's."""
    from_file: dict[str, Any] = read_yaml(config_file) if config_file else {}
    flags = {key: value for key, value in overrides.items() if value is not None}
    renamed = getattr(cls, "renamed_keys", {})
    sources = _Sources(config_file, {renamed.get(key, key) for key in from_file}, set(flags))
    try:
        settings = settings_from_dict(cls, {**from_file, **flags}, where=str(config_file or "settings"))
    except InvalidSetting as error:
        raise sources.locate(error) from None
    settings._sources = sources  # type: ignore[attr-defined]  # not a field: asdict and == ignore it
    return settings


@dataclass(frozen=True)
class _Sources:
    """Where load_settings took each value from: the YAML file's keys (renamed ones by their new name) and
    the flags given."""

    config_file: str | Path | None
    file_keys: set[str]
    flags: set[str]

    def locate(self, error: InvalidSetting) -> InvalidSetting:
        """`error` reworded to name where its field's value came from (the same error if from neither)."""
        if error.field in self.flags:  # "batch_size=0 is invalid: ..." -> "--batch-size=0 is invalid: ..."
            flag = "--" + error.field.replace("_", "-")
            message = str(error)
            message = (
                flag + message[len(error.field) :]
                if message.startswith(error.field)
                else f"{flag}: {message}"
            ).removesuffix(" or null")  # a flag cannot say null: it is left out
            return InvalidSetting(error.field, message)
        if error.field in self.file_keys:
            return InvalidSetting(error.field, f"{self.config_file}: {error}")
        return error


def locate(settings: Any, error: InvalidSetting) -> InvalidSetting:
    """`error`, about a field of `settings` found invalid after they were loaded (e.g. a name that only a
    registry behind torch can check), worded as load_settings words it: naming the YAML file the value came
    from (`X.yaml: adapter_config: ...`) or its flag; unchanged for settings built otherwise."""
    sources: _Sources | None = getattr(settings, "_sources", None)
    return sources.locate(error) if sources is not None else error


def settings_from_dict(cls: type[S], values: dict[str, Any], where: str = "settings") -> S:
    """Build `cls` from a mapping, accepting renamed keys (a class's `renamed_keys`: old -> new) and
    refusing unknown ones."""
    renamed = getattr(cls, "renamed_keys", {})
    values = {renamed.get(key, key): value for key, value in values.items()}
    reject_unknown(values, (f.name for f in dataclasses.fields(cls)), where)
    return cls(**values)


def check_field_types(settings: Any) -> None:
    """Every field of a settings dataclass holds its declared type (see validation.check_type)."""
    for spec in dataclasses.fields(settings):
        check_type(spec.name, getattr(settings, spec.name), str(spec.type))


def _comma_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _pairs(text: str) -> dict[str, str]:
    """'a=x,b=y' -> {'a': 'x', 'b': 'y'} (a mapping given on the command line; never empty)."""
    pairs = {}
    for item in _comma_list(text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not name=value (e.g. instruction=question)")
        pairs[key.strip()] = value.strip()
    if not pairs:
        raise argparse.ArgumentTypeError(
            f"{text!r} names no column: expected name=value pairs, e.g. instruction=question,output=response"
        )
    return pairs


# Field annotation (as written, postponed) -> argparse type; bools become store_true flags.
_FLAG_TYPES = {"str": str, "int": int, "float": float, "list[str]": _comma_list, "dict[str, str]": _pairs}


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of a settings dataclass, defaulting to None so that unset flags do not
    override the YAML file; fields with metadata flag=False are YAML-only (e.g. nested mappings), and
    list fields with repeat=True take one value per flag (--data a.jsonl --data b.jsonl), and a list field
    with positional=True is the command's positional arguments (comoe compare A.json B.json)."""
    for spec in dataclasses.fields(cls):
        if not spec.metadata.get("flag", True):
            continue
        annotation = str(spec.type).replace(" | None", "")
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if spec.default is not dataclasses.MISSING else None
        help_text = spec.metadata.get("help", "")
        if default not in (None, False, True):
            help_text += f" (default: {default})"
        if annotation == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        if spec.metadata.get("positional"):  # absent: not in the namespace, so the YAML file's value stays
            metavar = spec.name.upper().removesuffix("S")
            parser.add_argument(
                spec.name, nargs="*", default=argparse.SUPPRESS, metavar=metavar, help=help_text
            )
            continue
        if spec.metadata.get("repeat"):
            parser.add_argument(flag, action="append", default=None, help=help_text + " (repeatable)")
            continue
        parser.add_argument(
            flag,
            type=_FLAG_TYPES[annotation],
            choices=spec.metadata.get("choices"),
            default=None,
            help=help_text,
        )


# ---- a settings group shared by `comoe train` and `comoe eval` --------------------------------------------
# --format takes any registered record format (comoe.data.formats.RECORD_FORMATS, plugins included: the
# data layer checks the name when it reads the data, before a model is loaded); the templates are a fixed
# set (comoe.data.templates.TEMPLATE_NAMES), here because --help must not import the data layer;
# tests/data/test_templates.py checks that they agree.
FORMAT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
TEMPLATE_CHOICES = ("auto", "alpaca", "chat", "none")


@dataclass
class DataArgs:
    """Your own data: files or datasets folders, their record format, template and column names."""

    data: list[str] | None = setting(
        None,
        "your data: [name=]path to .json, .jsonl, .parquet, .csv or a save_to_disk folder (instead of "
        "--data-dir/--tasks; the task is 'name', else a record's task field, else the file's stem)",
        repeat=True,
    )
    format: str = setting(
        "auto",
        "record format of --data: auto (detected per file) or a registered format, built in: instruction, "
        "prompt_completion, messages (docs/data.md; your own through --plugin)",
    )
    template: str = setting(
        "auto",
        "prompt template (auto: chat for messages, alpaca for instruction records, none for "
        "prompt/completion)",
        choices=TEMPLATE_CHOICES,
    )
    columns: dict[str, str] = setting(
        {}, "rename the data's columns to comoe's names, e.g. instruction=question,output=response"
    )

    def check_data(self) -> None:
        if not FORMAT_NAME.match(self.format):
            fail("format", self.format, "auto or the name of a registered record format")
        check_choice("template", self.template, TEMPLATE_CHOICES)
        if self.data is not None and not self.data:
            raise ValueError("data: give at least one [name=]path")
        if getattr(self, "tasks", None) == []:  # `--tasks ,` or `tasks: []`: not "every built-in task"
            fail("tasks", [], "at least one task name (leave tasks out for every built-in task)")
        if self.data and (getattr(self, "data_dir", None) or getattr(self, "tasks", None)):
            raise ValueError(
                "data is exclusive with data_dir/tasks: --data names your files, --data-dir/--tasks the "
                "LLM-Adapters (or built-in) tasks"
            )
