"""What every benchmark shares: timing interleaved candidates and writing results with the machine."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from comoe.files import atomic_write_text


def interleaved_medians(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each candidate over `repeats` rounds that run every candidate once, in turn,
    after one warm-up round: drift on a shared machine then hits all candidates alike."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(repeats + 1):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def save_results(path: str | None, payload: dict[str, Any]) -> None:
    """Write the results as JSON with the machine they were measured on (no-op without a path)."""
    if not path:
        return
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    atomic_write_text(Path(path), json.dumps({"machine": machine, **payload}, indent=2) + "\n")
