"""Cost of the contrastive objectives per training step, against plain MoE-LoRA in the same run.

Two measurements, each the median of interleaved repeats:
- step: one forward + backward of SmolLM2-135M (q/k/v/o adapted, top-2 of n experts) with the objective
  off ("moe"), CoMoE, and MoELoRA; overhead = time / time(moe) - 1.
- objective: the CoMoE loss alone for one layer's tokens, from Gram matrices (comoe) versus from
  materialised expert outputs (the paper's way, comoe.losses.comoe_loss), forward + backward.

    python benchmarks/bench_objectives.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from comoe import ComoeConfig, get_comoe_model
from comoe.config import ComoeConfig as _Config
from comoe.layer import ComoeContext, ComoeLinear
from comoe.losses import comoe_loss
from comoe.models import load_base
from comoe.objectives import contrastive_loss


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def step_benchmark(experts: list[int], batch: int, seq: int, repeats: int) -> list[dict]:
    base, tokenizer = load_base("smollm2-135m")
    ids = torch.randint(0, tokenizer.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for n in experts:
        models = {}
        for name, contrastive in (("moe", "none"), ("comoe", "comoe"), ("moelora", "moelora")):
            config = ComoeConfig.preset("moe", num_experts=n, contrastive=contrastive, lora_dropout=0.0)
            model = get_comoe_model(base, config).train()
            with torch.no_grad():
                for layer in model.comoe_layers().values():
                    layer.lora_B.normal_(0, 0.01)  # trained-like experts, so cosines are not degenerate
            state = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
            model.unload()
            models[name] = (config, state)
        times: dict[str, list[float]] = {name: [] for name in models}
        for rep in range(repeats + 1):  # the first round warms up and is dropped
            for name, (config, state) in models.items():
                model = get_comoe_model(base, config).train()
                with torch.no_grad():
                    for key, value in model.adapter_state_dict().items():
                        value.copy_(state[key])

                def step(model=model) -> None:
                    model(input_ids=ids, labels=ids).loss.backward()

                elapsed = timed(step, 1)[0]
                model.unload()
                if rep:
                    times[name].append(elapsed)
        reference = statistics.median(times["moe"])
        for name, values in times.items():
            median = statistics.median(values)
            rows.append({"n": n, "method": name, "median_s": median, "overhead": median / reference - 1})
            print(f"step  n={n:2d} {name:8s} {median * 1e3:8.1f} ms  overhead {100 * (median / reference - 1):+6.1f}%")
    return rows


def objective_benchmark(experts: list[int], tokens: int, repeats: int) -> list[dict]:
    rows = []
    for n in experts:
        torch.manual_seed(0)
        config = _Config(num_experts=n, top_k=2, r=16, lora_dropout=0.0, contrastive="comoe")
        context = ComoeContext()
        layer = ComoeLinear(torch.nn.Linear(576, 576), config, context)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
        x = torch.randn(tokens, 576)
        context.keep_step = True

        def gram() -> None:
            layer(x)
            contrastive_loss(layer, layer.step, config).backward()

        def materialised() -> None:
            layer(x)
            outputs = torch.einsum("tnr,nro->tno", layer.step.z, layer.lora_B) * layer.scaling
            comoe_loss(outputs, layer.step.routing.indices, config.temperature).backward()

        def layer_only() -> None:
            layer(x).sum().backward()

        runs = {"layer": [], "gram": [], "materialised": []}
        for rep in range(repeats + 1):
            for name, fn in (("layer", layer_only), ("gram", gram), ("materialised", materialised)):
                elapsed = timed(fn, 1)[0]
                if rep:
                    runs[name].append(elapsed)
        base = statistics.median(runs["layer"])
        for name in ("gram", "materialised"):
            extra = statistics.median(runs[name]) - base
            rows.append({"n": n, "path": name, "objective_ms": 1e3 * extra, "layer_ms": 1e3 * base})
            print(f"objective n={n:2d} {name:13s} +{1e3 * extra:7.2f} ms over the layer's {1e3 * base:6.2f} ms")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few repeats (< 60 s)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    experts = [4, 8] if args.quick else [4, 8, 16]
    objective = objective_benchmark(experts, tokens=512 if args.quick else 2048, repeats=3 if args.quick else 9)
    step = step_benchmark(experts, batch=2 if args.quick else 4, seq=64 if args.quick else 128,
                          repeats=2 if args.quick else 5)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "objective": objective,
        "step": step,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
