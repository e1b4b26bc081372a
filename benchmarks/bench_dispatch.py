"""Dispatch count: aten ops and host syncs per adapted layer, the CPU-side proxy of GPU launch cost.

On a GPU at comoe's sizes a training step is bound by the host queuing kernels (~5-10 µs each), not by
arithmetic, so the number of dispatched ops per step predicts the step time there, and every host sync
(`aten._local_scalar_dense`: `.item()`, boolean indexing, `bincount` without minlength, a value-checking
`one_hot`) stalls the queue. This counts both with a TorchDispatchMode that sees every aten call, for one
forward + backward (training, labels given) and for one forward alone (inference), for PEFT LoRA (matched
to the comoe preset's trainable parameters) and every comoe preset, on a tiny Llama (hidden 256, 4 blocks,
q/k/v/o adapted: 16 layers, batch 4 x 64) and on SmolLM2-135M's shapes (random init from its config,
batch 2 x 64; --quick skips it). Reported per adapted layer: (method's ops - bare model's ops) / layers.
docs/performance.md turns these counts into an estimate of step time on a GPU.

    python benchmarks/bench_dispatch.py [--quick] [--json benchmarks/results/dispatch.json]
"""

from __future__ import annotations

from typing import Any

import torch
from common import benchmark_parser, load_model, save_results
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from comoe import ComoeConfig, get_comoe_model, matched_lora_config
from comoe.config import PRESETS

HOST_SYNC = torch.ops.aten._local_scalar_dense.default


class DispatchCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the block, and the host syncs among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        self.ops += 1
        self.syncs += func is HOST_SYNC
        return func(*args, **(kwargs or {}))


def count(model: torch.nn.Module, ids: torch.Tensor, training: bool) -> tuple[int, int]:
    """(ops, host syncs) of one forward + backward with labels (training) or one forward (inference)."""
    model.train(training)
    mask = torch.ones_like(ids)

    def step() -> None:
        if training:
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        else:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)

    step()  # warm-up: lazy initialisation is not part of a step
    with DispatchCounter() as counter:
        step()
    return counter.ops, counter.syncs


def methods(base_factory, preset_names: list[str]) -> dict[str, Any]:
    """name -> a fresh model: the bare base, PEFT LoRA matched to the comoe preset, each preset."""
    built = {"base": base_factory, "peft-lora": lambda: _lora(base_factory())}
    for name in preset_names:
        built[name] = lambda name=name: get_comoe_model(
            base_factory(), ComoeConfig.preset(name, lora_dropout=0.0)
        )
    return built


def _lora(base: torch.nn.Module) -> torch.nn.Module:
    config = matched_lora_config(ComoeConfig.preset("comoe", lora_dropout=0.0), base)
    config.lora_dropout = 0.0
    return get_peft_model(base, config)


def measure(name: str, base_factory, ids: torch.Tensor, presets: list[str]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for method, factory in methods(base_factory, presets).items():
        try:
            model = factory()
            rows[method] = {mode: count(model, ids, mode == "train") for mode in ("train", "inference")}
        except ValueError as error:  # a preset that needs more than input ids (a task vocabulary, task ids)
            print(f"{name}: {method} skipped: {str(error).splitlines()[0][:120]}")
            continue
        rows[method]["adapted_layers"] = adapted_layers(model)
    bare = dict(rows["base"])
    for row in rows.values():
        layers = max(1, row["adapted_layers"])
        for mode in ("train", "inference"):
            ops, syncs = row[mode]
            base_ops, base_syncs = bare[mode]
            row[mode] = {
                "ops": ops,
                "syncs": syncs,
                "ops_per_layer": (ops - base_ops) / layers,
                "syncs_per_layer": (syncs - base_syncs) / layers,
            }
    return {"model": name, "tokens": list(ids.shape), "methods": rows}


def adapted_layers(model: torch.nn.Module) -> int:
    """The linears a method adapted: comoe's routed layers, PEFT's LoRA layers, none for the bare model."""
    if hasattr(model, "comoe_layers"):
        return len(model.comoe_layers())
    return sum(1 for module in model.modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer"))


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    parser = benchmark_parser(__doc__, quick="the tiny Llama only (not SmolLM2-135M's shapes)")
    args = parser.parse_args()
    presets = list(PRESETS)
    results = [
        measure(
            "tiny-llama",
            tiny_llama,
            torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0)),
            presets,
        )
    ]
    if not args.quick:

        def smollm2() -> torch.nn.Module:
            return load_model("smollm2-135m", "float32", "cpu", random_init=True)[0]

        ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
        results.append(measure("smollm2-135m (random init)", smollm2, ids, presets))
    for result in results:
        print(f"\n{result['model']}: tokens {result['tokens']}")
        print(
            f"{'method':10s} {'layers':>6s} {'train ops/layer':>16s} {'syncs/layer':>12s} "
            f"{'infer ops/layer':>16s} {'syncs/layer':>12s}"
        )
        for method, row in result["methods"].items():
            if method == "base":
                continue
            train, infer = row["train"], row["inference"]
            print(
                f"{method:10s} {row['adapted_layers']:6d} {train['ops_per_layer']:16.1f} "
                f"{train['syncs_per_layer']:12.2f} "
                f"{infer['ops_per_layer']:16.1f} {infer['syncs_per_layer']:12.2f}"
            )
    save_results(args.json, {"results": results})


if __name__ == "__main__":
    main()
