"""Cost of the CoMoE loss for one layer: exact Gram-matrix path against materialised expert outputs.

One 576 -> 576 layer, T tokens, top-2 of n rank-16 experts, forward + backward; the objective's cost is the
extra time over the layer alone (median of interleaved repeats). "gram" is the objective as training runs
it (comoe.objectives.gram_infonce: one autograd Function with a hand-derived backward); "gram autograd" the
same cosines and InfoNCE left to autograd (objectives.gram.anchor_cosines, then
comoe_loss_from_anchor_cosines); "materialised" is the paper's way: all n expert outputs [T, n, d_out], then
their cosines (comoe.losses.comoe_loss). The per-step overhead of the
objectives on the whole model is measured by bench_step.py (comoe vs moe4, comoe8 vs moe8, ...).

    python benchmarks/bench_objectives.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools

import torch
from common import interleaved_medians, save_results

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import ComoeConfig
from comoe.moe.experts import expert_gram
from comoe.objectives.auxiliary import contrastive_loss
from comoe.objectives.gram import anchor_cosines
from comoe.objectives.infonce import comoe_loss_from_anchor_cosines
from comoe.objectives.reference import comoe_loss


def make_layer(n: int) -> tuple[ComoeLinear, ComoeConfig]:
    torch.manual_seed(0)
    config = ComoeConfig(num_experts=n, top_k=2, r=16, lora_dropout=0.0, contrastive="comoe")
    context = ComoeContext()
    context.keep_records = True
    layer = ComoeLinear(torch.nn.Linear(576, 576), config, context)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    return layer, config


def layer_only(layer: ComoeLinear, config: ComoeConfig, x: torch.Tensor) -> None:
    layer(x).sum().backward()


def gram(layer: ComoeLinear, config: ComoeConfig, x: torch.Tensor) -> None:
    (layer(x).sum() + contrastive_loss(layer.record, config)).backward()


def gram_autograd(layer: ComoeLinear, config: ComoeConfig, x: torch.Tensor) -> None:
    out = layer(x)
    record = layer.record
    indices = record.routing.indices
    rows = anchor_cosines(record.z, indices, expert_gram(record.lora_B), record.norm_floor)
    loss = comoe_loss_from_anchor_cosines(rows, indices, config.temperature, config.anchor, check=False)
    (out.sum() + loss).backward()


def materialised(layer: ComoeLinear, config: ComoeConfig, x: torch.Tensor) -> None:
    out = layer(x)
    outputs = torch.einsum("tnr,nro->tno", layer.record.z, layer.lora_B) * layer.scaling
    (out.sum() + comoe_loss(outputs, layer.record.routing.indices, config.temperature)).backward()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="512 tokens, n in {4, 8}, few repeats")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    tokens, repeats = (512, 5) if args.quick else (2048, 15)
    rows = []
    for n in [4, 8] if args.quick else [4, 8, 16]:
        layer, config = make_layer(n)
        x = torch.randn(tokens, 576)
        runs = {
            name: functools.partial(fn, layer, config, x)
            for name, fn in (
                ("layer", layer_only),
                ("gram", gram),
                ("gram_autograd", gram_autograd),
                ("materialised", materialised),
            )
        }
        medians = interleaved_medians(runs, repeats)
        row = {"n": n, "tokens": tokens, "layer_ms": 1e3 * medians["layer"]}
        for name in ("gram", "gram_autograd", "materialised"):
            row[f"{name}_extra_ms"] = 1e3 * (medians[name] - medians["layer"])
        rows.append(row)
        print(
            f"n={n:2d}  layer {row['layer_ms']:6.2f} ms   CoMoE loss: Gram +{row['gram_extra_ms']:6.2f} ms, "
            f"Gram autograd +{row['gram_autograd_extra_ms']:6.2f} ms, "
            f"materialised +{row['materialised_extra_ms']:7.2f} ms"
        )
    save_results(args.json, {"rows": rows})


if __name__ == "__main__":
    main()
