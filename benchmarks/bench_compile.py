"""Eager against compiled training steps, per preset (`comoe train --compile`: every decoder block
compiled with torch.compile, comoe.models.compile.compile_blocks).

The tiny Llama of bench_dispatch.py (hidden 256, 4 blocks, q/k/v/o adapted; batch 4 x 64, labels given,
the task ids a task-routed preset reads), one forward + backward + AdamW step. Per preset, two models of
the same initialisation, one compiled: the compiling step (and one more) untimed, then the two stepped
alternately so that a busy machine's drift hits both alike; medians, the compiled/eager ratio, and the
first (compiling) step's seconds. The ratio is what this CPU says; on a GPU the gain of fewer launches is
larger (benchmarks/gpu_suite.py).

    python benchmarks/bench_compile.py [--quick] [--json benchmarks/results/compile.json]
"""

from __future__ import annotations

import statistics
import time

import torch
from bench_dispatch import tiny_llama
from common import benchmark_parser, save_results

from comoe import ComoeConfig, get_comoe_model
from comoe.config import PRESETS
from comoe.models.compile import compile_blocks


def trainer(preset: str, compiled: bool):
    """(step function, seconds of the first step) for one model of `preset`."""
    config = ComoeConfig.preset(preset, lora_dropout=0.0, tasks=["task0", "task1"])
    model = get_comoe_model(tiny_llama(), config).train()
    if compiled:
        compile_blocks(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    for name in getattr(model, "call_input_names", ()):
        inputs[name] = torch.arange(4) % 2

    def step() -> float:
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = step()
    step()
    return step, first


def measure(preset: str, steps: int) -> dict:
    eager, _ = trainer(preset, compiled=False)
    compiled, first = trainer(preset, compiled=True)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(steps):
        times["eager"].append(eager())
        times["compiled"].append(compiled())
    eager_ms, compiled_ms = (1e3 * statistics.median(times[name]) for name in ("eager", "compiled"))
    return {
        "preset": preset,
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "compiled_over_eager": compiled_ms / eager_ms,
        "first_compiled_step_s": first,
    }


def main() -> None:
    parser = benchmark_parser(__doc__, quick="comoe, moe and moelora only, 3 timed steps")
    parser.add_argument("--presets", help="comma list of presets (default: every preset)")
    args = parser.parse_args()
    presets = (
        args.presets.split(",")
        if args.presets
        else (["comoe", "moe", "moelora"] if args.quick else list(PRESETS))
    )
    rows = []
    for preset in presets:
        torch._dynamo.reset()
        row = measure(preset, 3 if args.quick else 8)
        rows.append(row)
        print(
            f"{preset:12s} eager {row['eager_ms']:7.1f} ms  compiled {row['compiled_ms']:7.1f} ms  "
            f"x{row['compiled_over_eager']:.2f}  (compiling step {row['first_compiled_step_s']:.0f} s)",
            flush=True,
        )
    save_results(
        args.json,
        {"model": "tiny-llama 4 x 256, batch 4 x 64", "threads": torch.get_num_threads(), "rows": rows},
    )


if __name__ == "__main__":
    main()
