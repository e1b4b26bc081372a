"""What every benchmark shares: timing interleaved candidates and writing results with the machine."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from comoe.files import atomic_write_text
from comoe.models.gguf import alias_cache, cache_root
from comoe.models.loading import load_base

DTYPES = ("float32", "bfloat16", "float16")


def benchmark_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """The flags every benchmark has: --quick (what it shrinks to) and --json (where results go)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--json", help="write the results here")
    return parser


def add_device_flags(parser) -> None:
    """--device, --dtype and --random-init, shared by the benchmarks that run a whole model."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="base model and activations")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="random weights for the model's config: --model may then be a folder with only config.json "
        "and the tokenizer (speed depends on the architecture, not on the weights)",
    )


def load_model(name: str, dtype: str, device: str, random_init: bool = False):
    """The base model (eval mode) on `device` in `dtype`, and its tokenizer."""
    if random_init:
        folder = Path(name) if Path(name).is_dir() else alias_cache(name, cache_root(None))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
    else:
        model, tokenizer = load_base(name, dtype=getattr(torch, dtype))
    return model.to(device), tokenizer


def synchronize() -> None:
    """Wait for queued GPU work, so that a timer stopped after it measures the work (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_medians(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each candidate over `repeats` rounds that run every candidate once, in turn,
    after one warm-up round: drift on a shared machine then hits all candidates alike."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(repeats + 1):
        for name, run in candidates.items():
            synchronize()
            start = time.perf_counter()
            run()
            synchronize()
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
