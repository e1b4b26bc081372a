"""Checks of user-given values that name the field, the value and the valid range in one line.

Every settings object (ComoeConfig, the train/eval/analyze settings) validates through these helpers, so a
bad value reads the same wherever it comes from: a flag, a YAML file or an adapter_config.json.
Pure Python: the command line imports this before it knows whether torch is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn


class InvalidSetting(ValueError):
    """A value outside its valid range or of the wrong type; `field` names the setting it belongs to, so a
    loader can say where the value came from (a YAML file, a flag, an adapter config)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def fail(name: str, value: Any, valid: str) -> NoReturn:
    raise InvalidSetting(name, f"{name}={value!r} is invalid: expected {valid}")


def check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        fail(name, value, f"an integer >= {low}")


def check_number(
    name: str, value: Any, low: float, high: float | None = None, low_open: bool = False
) -> None:
    """A finite real number in [low, high) (or (low, high) with low_open); bools and NaN are refused."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        lower = f"> {low}" if low_open else f">= {low}"
        fail(name, value, f"a finite number {lower}" + (f" and < {high}" if high is not None else ""))


def check_device(name: str, value: Any) -> None:
    """A device name: auto, cpu, mps, cuda or cuda:N (whether it exists here is comoe.models.device's)."""
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", value):
        fail(name, value, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def reject_unknown(values: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """Refuse keys that are not settings, so a typo never passes silently as a default."""
    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown}; valid fields: {known}")


# Declared field types (as written in postponed annotations) -> (accepted Python types, wording).
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"),
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "list[str]": ((list,), "a list of strings"),
    "str | list[str]": ((str, list), "a string or a list of strings"),
    "dict[str, Any]": ((dict,), "a mapping"),
    "dict[str, str]": ((dict,), "a mapping of strings to strings"),
}


# What a text setting must hold beyond its type: no empty or whitespace-only text (a path, a model name, a
# prompt, a task name, a column name); a list may be empty (the field's own check says when it must not be).
_NON_EMPTY: dict[str, str] = {
    "str": "a non-empty string",
    "list[str]": "a list of non-empty strings",
    "str | list[str]": "a non-empty string or a list of them",
    "dict[str, str]": "a mapping of non-empty strings to non-empty strings",
}


def _blank(value: Any, base: str) -> bool:
    """Whether a value of the declared type holds empty or whitespace-only text."""
    if base == "str":
        return not value.strip()
    if base in ("list[str]", "str | list[str]"):
        return any(not item.strip() for item in ([value] if isinstance(value, str) else value))
    if base == "dict[str, str]":
        return any(not key.strip() or not item.strip() for key, item in value.items())
    return False


def check_type(name: str, value: Any, annotation: str) -> None:
    """`value` has the declared type, with no coercion: no bool for an int, no float for an int, no string
    for a number or a switch, and finite floats only; and no empty or whitespace-only text in a string,
    a list of strings or a mapping of strings."""
    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None:
        if not optional:
            fail(name, value, _TYPES[base][1])
        return
    accepted, wording = _TYPES[base]
    ok = isinstance(value, accepted) and (base == "bool" or not isinstance(value, bool))
    if ok and base == "float":
        ok = math.isfinite(value)
        wording = "a finite number"
    if ok and base in ("list[str]", "str | list[str]") and isinstance(value, list):
        ok = all(isinstance(item, str) for item in value)
    if ok and base == "dict[str, Any]":
        ok = all(isinstance(key, str) for key in value)
    if ok and base == "dict[str, str]":
        ok = all(isinstance(key, str) and isinstance(item, str) for key, item in value.items())
    if not ok:
        fail(name, value, wording + (" or null" if optional else ""))
    if _blank(value, base):
        wording = _NON_EMPTY["str" if isinstance(value, str) else base]  # a path given as one string: said so
        fail(name, value, wording + (" or null" if optional else ""))
