"""The prepared GPU suite: what a lent GPU runs first, in one call, within a time budget (default 8 min).

Nothing comes from the internet: models are random-init from the configs in benchmarks/configs/
(SmolLM2-135M's shapes, and Llama-3-8B's shapes cut to a few blocks), batches are random token ids with
the first quarter of each row masked out of the labels (a prompt). Speed depends on shapes, not weights.

Sections, each timed with interleaved medians (benchmarks/common.py) and recorded even when a later one fails:
- **layer**: one adapted linear (SmolLM2's q_proj shape, 4096 tokens) forward + backward, per registered mix
  strategy (blocks, grouped, and any fused/Triton strategy registered on this device) against PEFT LoRA's
  linear of the same active rank;
- **step**: a full training step (forward, backward, AdamW) per method, eager and, for the methods in
  --compiled, with the decoder blocks compiled (comoe.models.compile), at SmolLM2-135M shapes (batch 8 x
  512) and at the cut Llama-3-8B shapes (batch 8 x 512), with ratios to PEFT LoRA matched to the comoe
  preset's trainable parameters, peak GPU memory, and the ops and host syncs of one step (counted with a
  TorchDispatchMode, as benchmarks/bench_dispatch.py does);
- **eval**: a no-grad forward over batch 16 x 512 (log-likelihood evaluation's work) per method;
- **generation**: greedy generation of 64 new tokens at batch 16 with the KV cache, tokens/s per method;
- **4bit**: a training step on a bitsandbytes 4-bit base (NF4, bf16 compute) for lora, moe and comoe, when
  bitsandbytes and CUDA are present.

Results: benchmarks/results/<device>/gpu_suite.json and gpu_suite.md (<device> from the GPU's name, e.g.
nvidia-h200), each row with the device, torch and CUDA versions. On a machine without a GPU, --smoke runs
every section at tiny shapes on the CPU (the suite's own test, tests/benchmarks/test_gpu_suite.py).

    PYTHONPATH=src python benchmarks/gpu_suite.py [--budget-s 480] [--methods lora,moe,comoe,...] [--smoke]

(PYTHONPATH=src where comoe is not installed, e.g. on a GPU machine with its own torch.)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import interleaved_medians, synchronize
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.adapter.method import method_for
from comoe.config import BASELINES, ComoeConfig
from comoe.files import atomic_write_text
from comoe.models.compile import compile_blocks
from comoe.moe.experts import STRATEGIES

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
METHODS = ["lora", "moe", "comoe", "moelora", "mixlora", "hydralora", "omoe", "mola", "dora"]
COMPILED = ["lora", "moe", "comoe", "moelora"]
HOST_SYNC = torch.ops.aten._local_scalar_dense.default


class Counter(TorchDispatchMode):
    """Every aten op dispatched inside the block, and the host syncs among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        self.ops += 1
        self.syncs += func is HOST_SYNC
        return func(*args, **(kwargs or {}))


class Suite:
    """The run's settings, its clock and its results (written after every section)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.start = time.perf_counter()
        self.results: dict[str, Any] = {
            "machine": machine(self.device),
            "settings": vars(args),
            "sections": {},
        }
        self.out = Path(args.out) if args.out else HERE / "results" / device_slug(self.device)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def section(self, name: str, run: Callable[[], Any]) -> None:
        """Run one section unless the budget is spent; its rows or its error are recorded and saved."""
        if self.left() <= 0:
            self.results["sections"][name] = {"skipped": "time budget spent"}
        else:
            began = time.perf_counter()
            try:
                rows = run()
                self.results["sections"][name] = {"rows": rows, "seconds": time.perf_counter() - began}
            except Exception as error:  # a failing section must not lose the others' results
                self.results["sections"][name] = {"error": f"{type(error).__name__}: {error}"}
                traceback.print_exc()
            release()
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "gpu_suite.json", json.dumps(self.results, indent=2) + "\n")
        atomic_write_text(self.out / "gpu_suite.md", markdown(self.results))


def machine(device: torch.device) -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-smoke"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def base_model(shape: str, suite: Suite) -> nn.Module:
    """A random-init model of benchmarks/configs/<shape>.json in the suite's dtype on its device."""
    config = AutoConfig.from_pretrained(CONFIGS / f"{shape}.json")
    if suite.args.smoke:  # tiny shapes for the CPU
        config.update(dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=256))
        config.update(dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32))  # k/v: 64 outputs
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=suite.dtype)
    return model.to(suite.device)


def adapted(base: nn.Module, method: str) -> nn.Module:
    """The method's model over `base`: comoe presets, and PEFT LoRA / DoRA matched to the comoe preset."""
    config = ComoeConfig.preset(BASELINES.get(method, method), lora_dropout=0.0)
    return method_for(method).build(base, config, False)


def each_method(suite: Suite, build: Callable[[str], Any]) -> tuple[dict[str, Any], list[dict]]:
    """build(method) for every method of the run; a method that fails is a row with its error, and the
    others still run."""
    built, failed = {}, []
    for method in suite.args.methods:
        try:
            built[method] = build(method)
        except Exception as error:
            failed.append({"method": method, "error": f"{type(error).__name__}: {error}"})
    return built, failed


def batch(model: nn.Module, rows: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1)).to(device)
    labels = ids.clone()
    labels[:, : length // 4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def sizes(suite: Suite) -> tuple[int, int]:
    return (2, 32) if suite.args.smoke else (8, 512)


def step_rows(shape: str, suite: Suite) -> list[dict]:
    """Training step per method (eager; compiled for --compiled): median ms, ratio to lora, the peak GPU
    memory of its warm-up and counted steps above what was allocated before it was built, ops and syncs."""
    rows_n, length = sizes(suite)
    on_gpu = suite.device.type == "cuda"
    runs: dict[str, Callable[[], Any]] = {}
    extra: dict[str, dict] = {}
    failed = []
    for method in suite.args.methods:
        for compiled in (False, True) if method in suite.args.compiled else (False,):
            name = f"{method}{' compiled' if compiled else ''}"
            try:
                runs[name], extra[name] = _training_step(
                    shape, method, compiled, suite, rows_n, length, on_gpu
                )
            except Exception as error:
                failed.append({"shape": shape, "method": name, "error": f"{type(error).__name__}: {error}"})
            if suite.left() < 60:
                break
    medians = interleaved_medians(runs, suite.args.repeats)
    lora = medians.get("lora")
    return [
        {
            "shape": shape,
            "method": name,
            "median_ms": 1e3 * median,
            "tokens_per_s": rows_n * length / median,
            "over_lora": median / lora if lora else None,
            **extra[name],
        }
        for name, median in medians.items()
    ] + failed


def _training_step(
    shape: str, method: str, compiled: bool, suite: Suite, rows_n: int, length: int, on_gpu: bool
) -> tuple[Callable[[], None], dict]:
    """A ready training step of one method (built, warmed up, counted) and its measurements."""
    before = torch.cuda.memory_allocated() if on_gpu else 0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    model = adapted(base_model(shape, suite), method).train()
    if compiled:
        compile_blocks(model)
    data = batch(model, rows_n, length, suite.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        model(**data).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    began = time.perf_counter()
    step()  # warm-up (and compilation)
    synchronize()
    warmup = time.perf_counter() - began
    measured: dict[str, Any] = {"warmup_s": warmup}
    if not compiled:  # a dispatch mode around a compiled block would make it recompile
        with Counter() as counter:
            step()
        synchronize()
        measured.update(ops=counter.ops, syncs=counter.syncs)
    if on_gpu:
        measured["peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
    return step, measured


def layer_rows(suite: Suite) -> list[dict]:
    """One adapted linear forward + backward per mix strategy, against a LoRA linear of the active rank."""
    tokens, d_in, d_out = (256, 64, 64) if suite.args.smoke else (4096, 576, 576)
    x = torch.randn(tokens, d_in, device=suite.device, dtype=suite.dtype, requires_grad=True)
    runs: dict[str, Callable[[], Any]] = {}
    base = nn.Linear(d_in, d_out, bias=False).to(suite.device, suite.dtype).requires_grad_(False)
    for strategy in STRATEGIES:
        config = ComoeConfig.preset("comoe", lora_dropout=0.0, expert_compute=strategy)
        try:
            layer = ComoeLinear(base, config, ComoeContext()).train()
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.02)
            layer(x)  # does the strategy run on this device?
        except Exception as error:  # a strategy for another device
            print(f"layer: strategy {strategy} skipped: {error}", file=sys.stderr)
            continue
        runs[strategy] = lambda layer=layer: layer(x).float().square().mean().backward()
    a = torch.randn(32, d_in, device=suite.device, requires_grad=True)
    b = torch.zeros(d_out, 32, device=suite.device, requires_grad=True)

    def lora() -> None:
        out = base(x) + ((x.float() @ a.t()) @ b.t()).to(suite.dtype)
        out.float().square().mean().backward()

    runs["lora r=32"] = lora
    medians = interleaved_medians(runs, suite.args.repeats * 3)
    return [
        {"strategy": name, "median_ms": 1e3 * m, "over_lora": m / medians["lora r=32"]}
        for name, m in medians.items()
    ]


def eval_rows(suite: Suite) -> list[dict]:
    """A no-grad forward over batch 16 x 512 per method (log-likelihood evaluation's work)."""
    length = 32 if suite.args.smoke else 512

    def build(method: str) -> Callable[[], None]:
        model = adapted(base_model("smollm2-135m", suite), method).eval()
        data = batch(model, 16 if not suite.args.smoke else 2, length, suite.device)
        data.pop("labels")
        return lambda: _no_grad(model, data)

    runs, failed = each_method(suite, build)
    medians = interleaved_medians(runs, suite.args.repeats)
    lora = medians.get("lora")
    rows = [
        {"method": m, "median_ms": 1e3 * t, "over_lora": t / lora if lora else None}
        for m, t in medians.items()
    ]
    return rows + failed


def _no_grad(model: nn.Module, data: dict) -> None:
    with torch.no_grad():
        model(**data)


def generation_rows(suite: Suite) -> list[dict]:
    """Greedy generation of 64 new tokens (8 in --smoke) at batch 16 with the KV cache, per method."""
    new = 8 if suite.args.smoke else 64
    rows_n, prompt = (2, 16) if suite.args.smoke else (16, 128)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def build(method: str) -> Callable[[], None]:
        model = adapted(base_model("smollm2-135m", suite), method).eval()
        ids = batch(model, rows_n, prompt, suite.device)["input_ids"]

        def generate() -> None:
            with torch.no_grad():
                model.generate(input_ids=ids, **kwargs)

        return generate

    runs, failed = each_method(suite, build)
    medians = interleaved_medians(runs, suite.args.repeats)
    lora = medians.get("lora")
    rows = [
        {
            "method": m,
            "median_s": t,
            "tokens_per_s": rows_n * new / t,
            "over_lora": lora / t if lora else None,
        }
        for m, t in medians.items()
    ]
    return rows + failed


def four_bit_rows(suite: Suite) -> list[dict]:
    """A training step on a bitsandbytes NF4 base (SmolLM2 shapes) for lora, moe and comoe."""
    if suite.device.type != "cuda":
        return [{"skipped": "bitsandbytes 4-bit training runs on CUDA only in this suite"}]
    rows_n, length = sizes(suite)
    with tempfile.TemporaryDirectory() as folder:
        base_model("smollm2-135m", suite).save_pretrained(folder)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        runs = {}
        for method in ("lora", "moe", "comoe"):
            base = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=quantization, device_map={"": 0}
            )
            model = adapted(base, method).train()
            data = batch(model, rows_n, length, suite.device)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

            def step(model=model, data=data, optimizer=optimizer) -> None:
                model(**data).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            runs[method] = step
        medians = interleaved_medians(runs, suite.args.repeats)
    return [{"method": m, "median_ms": 1e3 * t, "over_lora": t / medians["lora"]} for m, t in medians.items()]


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables, one per section (its rows' keys as columns)."""
    lines = [f"# GPU suite: {json.dumps(results['machine'])}", ""]
    for name, section in results["sections"].items():
        lines.append(f"## {name}")
        if "rows" not in section:
            lines += [f"{section}", ""]
            continue
        rows = section["rows"]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        for row in rows:
            lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
        lines += ["", f"{section['seconds']:.0f} s", ""]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting sections after this")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    parser.add_argument("--compiled", type=lambda s: s.split(","), default=COMPILED)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per timing")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the suite runs")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--sections", type=lambda s: s.split(","), default=None, help="run only these")
    args = parser.parse_args()
    suite = Suite(args)
    sections = {
        "layer": lambda: layer_rows(suite),
        "step smollm2-135m": lambda: step_rows("smollm2-135m", suite),
        "eval": lambda: eval_rows(suite),
        "generation": lambda: generation_rows(suite),
        "step llama3-8b-cut": lambda: step_rows("llama3-8b-cut", suite),
        "4bit": lambda: four_bit_rows(suite),
    }
    for name, run in sections.items():
        if args.sections is None or name in args.sections:
            suite.section(name, run)
    print(markdown(suite.results))


if __name__ == "__main__":
    main()
