"""Checks of user-given values that name the field, the value and the valid range in one line.

Every settings object (ComoeConfig, the train/eval/analyze settings) validates through these helpers, so a
bad value reads the same wherever it comes from: a flag, a YAML file or an adapter_config.json.
Pure Python: the command line imports this before it knows whether torch is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn


def fail(name: str, value: Any, valid: str) -> NoReturn:
    raise ValueError(f"{name}={value!r} is invalid: expected {valid}")


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
