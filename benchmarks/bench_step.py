"""Step-level speed: one full training step (forward, backward, AdamW) of SmolLM2-135M per method.

Methods: lora (PEFT LoRA of rank k*r = 32 on q/k/v/o: the matched active rank), moe4 / moe8 / moe16 (top-2
of n rank-16 experts, no auxiliary loss), comoe / comoe8 / comoe16 (the same + the CoMoE loss; comoe is the
preset), moelora (the moelora preset: top-2 of 8, balance + MoELoRA loss). Each method runs in its
own process so that peak memory (max RSS above the loaded model) is its own. The batch is random tokens
with the first quarter of each row masked out of the labels (a prompt), as the trainer computes it.

    python benchmarks/bench_step.py [--quick] [--json FILE] [--compile]

--compile compiles every decoder block first (comoe.models.compile.compile_blocks, as `comoe train
--compile`); the first step, which compiles, is reported apart (compile_s) and not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from common import add_device_flags, load_model, save_results, synchronize
from peft import LoraConfig, get_peft_model

from comoe import ComoeConfig, get_comoe_model
from comoe.models.compile import compile_blocks
from comoe.training.loss import response_loss

METHODS = {
    "lora": None,
    "moe4": dict(preset="moe"),
    "moe8": dict(preset="moe", num_experts=8),
    "comoe": dict(preset="comoe"),
    "comoe8": dict(preset="comoe", num_experts=8),
    "moe16": dict(preset="moe", num_experts=16),
    "comoe16": dict(preset="comoe", num_experts=16),
    "moelora": dict(preset="moelora"),
}


def run_one(method: str, batch: int, seq: int, repeats: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    base, tokenizer = load_model(args.model, args.dtype, args.device, args.random_init)
    spec = METHODS.get(method, dict(preset=method))  # any other name: a comoe preset at its defaults
    if spec is None:
        config = LoraConfig(
            r=32, lora_alpha=64, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        model = get_peft_model(base, config)
    else:
        fields = dict(spec)
        name = fields.pop("preset")
        # a two-task vocabulary for the presets that route or balance by task (unused by the others)
        config = ComoeConfig.preset(name, lora_dropout=0.0, tasks=["task0", "task1"], **fields)
        model = get_comoe_model(base, config)
    model.train()
    if args.compile:
        compile_blocks(model)
    ids = torch.randint(0, tokenizer.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    for name in getattr(model, "call_input_names", ()):  # task ids: alternate rows of the two tasks
        data[name] = (torch.arange(batch) % 2).to(args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    on_gpu = args.device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        baseline_kb = torch.cuda.memory_allocated() / 1024
    times = []
    for rep in range(repeats + 1):
        start = time.perf_counter()
        task, aux = response_loss(model, data)
        (task + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if rep:  # the first step warms up (allocations, optimizer state, compilation)
            times.append(time.perf_counter() - start)
        else:
            first = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if on_gpu:
        peak_kb = torch.cuda.max_memory_allocated() / 1024
    median = statistics.median(times)
    return {
        "method": method,
        "median_s": median,
        "tokens_per_s": batch * seq / median,
        "peak_extra_mb": (peak_kb - baseline_kb) / 1024,
        "times_s": times,
        "first_step_s": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 2 x 64, lora / moe4 / comoe / moelora, one measured step (< 60 s)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--methods",
        help="comma list of the names above or any comoe preset (default: the names above; --quick: "
        "lora,moe4,comoe,moe8,moelora)",
    )
    parser.add_argument("--batch", type=int, help="sequences per step (default 8; --quick 2)")
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 256; --quick 64)")
    add_device_flags(parser)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per method (default 3)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every decoder block first")
    args = parser.parse_args()
    batch, seq = (2, 64) if args.quick else (8, 256)
    batch, seq = args.batch or batch, args.seq or seq
    if args.one:
        print(json.dumps(run_one(args.one, batch, seq, 1 if args.quick else 2, args)))
        return
    rounds = args.rounds or (1 if args.quick else 3)
    methods = ["lora", "moe4", "comoe", "moe8", "moelora"] if args.quick else list(METHODS)
    methods = args.methods.split(",") if args.methods else methods
    results: dict[str, list[dict]] = {m: [] for m in methods}
    failures: dict[str, str] = {}
    passed = sys.argv[1:]  # the same settings for every method's process (--json is written here only)
    for _ in range(rounds):  # interleave methods across rounds: drift on a shared machine hits all alike
        for method in methods:
            command = [sys.executable, __file__, "--one", method, *passed]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:  # recorded beside the others (e.g. a preset that does not compile)
                lines = done.stderr.strip().splitlines() or ["no output"]
                failures[method] = lines[-1][:300]
                print(f"{method}: failed: {failures[method]}", file=sys.stderr)
                continue
            results[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
    lora = statistics.median(t for r in results["lora"] for t in r["times_s"])
    rows = []
    for method, runs in results.items():
        if not runs:
            continue
        median = statistics.median(t for r in runs for t in r["times_s"])
        memory = max(r["peak_extra_mb"] for r in runs)
        rows.append(
            {
                "method": method,
                "median_s": median,
                "tokens_per_s": batch * seq / median,
                "over_lora": median / lora,
                "peak_extra_mb": memory,
                "first_step_s": statistics.median(r["first_step_s"] for r in runs),
            }
        )
    medians = {r["method"]: r["median_s"] for r in rows}
    lora_memory = next(r["peak_extra_mb"] for r in rows if r["method"] == "lora")
    print(f"batch {batch} x {seq} tokens, {args.model}, {args.dtype} on {args.device}, {rounds} rounds")
    for row in rows:
        versus = {"comoe": "moe4", "comoe8": "moe8", "comoe16": "moe16", "moelora": "moe8"}.get(row["method"])
        extra = f"  x{row['median_s'] / medians[versus]:.2f} of {versus}" if versus in medians else ""
        print(
            f"{row['method']:8s} {1e3 * row['median_s']:8.0f} ms  {row['tokens_per_s']:6.0f} tok/s  "
            f"x{row['over_lora']:.2f} of lora  mem +{row['peak_extra_mb']:.0f} MB "
            f"(x{row['peak_extra_mb'] / max(lora_memory, 1):.2f}){extra}"
        )
    settings = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "random_init": args.random_init,
        "compile": args.compile,
    }
    save_results(
        args.json, {"batch": batch, "seq": seq, "settings": settings, "rows": rows, "failures": failures}
    )


if __name__ == "__main__":
    main()
