"""Layer-level speed: one adapted linear, forward + backward over T tokens, against the usual alternatives.

Compared in the same run, interleaved, median of repeats (fp32 on the CPU by default; --device cuda
--dtype bfloat16 on a GPU):
- comoe (auto), comoe blocks, comoe grouped: comoe's layer with each expert strategy;
- lora: PEFT LoRA of rank k*r (the same useful arithmetic: the floor for k active rank-r experts);
- loop: a per-expert Python loop with index_select / index_add (how existing MoE-LoRA code computes);
- dense: every expert on every token (einsum), gates masked;
- base: the frozen linear alone.

    python benchmarks/bench_layer.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from common import DTYPES, interleaved_medians, save_results
from peft import LoraConfig, get_peft_model
from torch import nn

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import ComoeConfig

SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096)]


def make_comoe(base: nn.Linear, n: int, k: int, r: int, strategy: str) -> ComoeLinear:
    config = ComoeConfig(num_experts=n, top_k=k, r=r, lora_dropout=0.0, expert_compute=strategy)
    layer = ComoeLinear(base, config, ComoeContext())
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    return layer


def loop_forward(layer: ComoeLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-expert loop of existing MoE-LoRA code, on comoe's parameters."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(layer.router(x), dim=-1)
        gates, indices = probs.topk(layer.top_k, dim=-1)
        gates = gates / gates.sum(-1, keepdim=True)
        out = layer.base_layer(x)
        delta = torch.zeros_like(out)
        for i in range(layer.num_experts):
            token, slot = torch.where(indices == i)
            if token.numel() == 0:
                continue
            xi = x.index_select(0, token)
            yi = (xi @ layer.lora_A[i].t()) @ layer.lora_B[i] * layer.scaling
            delta = delta.index_add(0, token, yi * gates[token, slot].unsqueeze(-1))
        return out + delta

    return forward


def dense_forward(layer: ComoeLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    """Every expert on every token, then the gates (zero for inactive experts)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(layer.router(x), dim=-1)
        gates, indices = probs.topk(layer.top_k, dim=-1)
        dense = torch.zeros_like(probs).scatter(1, indices, gates / gates.sum(-1, keepdim=True))
        outputs = torch.einsum("td,nrd->tnr", x, layer.lora_A)
        outputs = torch.einsum("tnr,nro->tno", outputs, layer.lora_B) * layer.scaling
        return layer.base_layer(x) + (outputs * dense.unsqueeze(-1)).sum(1)

    return forward


def candidates(
    d_in: int, d_out: int, n: int, k: int, r: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False).to(device, dtype)
    holder = nn.ModuleDict({"proj": copy.deepcopy(base)})
    lora_config = LoraConfig(r=k * r, lora_alpha=2 * k * r, lora_dropout=0.0, target_modules=["proj"])
    lora = get_peft_model(holder, lora_config).base_model.model["proj"].to(device, dtype)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(0, 0.01)
    comoe = make_comoe(base, n, k, r, "auto")
    return {
        "base": base,
        "lora": lora,
        "comoe": comoe,
        "comoe blocks": make_comoe(base, n, k, r, "blocks"),
        "comoe grouped": make_comoe(base, n, k, r, "grouped"),
        "loop": loop_forward(comoe),
        "dense": dense_forward(comoe),
    }


def bench(
    d_in: int, d_out: int, n: int, k: int, r: int, tokens: int, repeats: int, device: str, dtype: torch.dtype
) -> dict[str, float]:
    x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d_out, device=device, dtype=dtype)

    def forward_backward(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        return lambda: fn(x).backward(grad)

    made = candidates(d_in, d_out, n, k, r, device, dtype)
    runs = {name: forward_backward(fn) for name, fn in made.items()}
    return interleaved_medians(runs, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="576->576 only, n in {4, 8}, few repeats (< 60 s)"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shapes = SHAPES[:1] if args.quick else SHAPES
    experts = [4, 8] if args.quick else [4, 8, 16]
    rows = []
    print(
        f"{'shape':>11} {'n':>3} "
        + " ".join(f"{name:>13}" for name in candidates(8, 8, 2, 1, 1))
        + "  comoe/lora"
    )
    for d_in, d_out in shapes:
        for n in experts:
            repeats = 3 if args.quick or (d_in * d_out > 4e6 and args.device == "cpu") else 9
            medians = bench(d_in, d_out, n, 2, 16, args.tokens, repeats, args.device, dtype)
            ratio = medians["comoe"] / medians["lora"]
            rows.append(
                {
                    "d_in": d_in,
                    "d_out": d_out,
                    "n": n,
                    "k": 2,
                    "r": 16,
                    "tokens": args.tokens,
                    "median_ms": {name: 1e3 * t for name, t in medians.items()},
                    "comoe_over_lora": ratio,
                }
            )
            cells = " ".join(f"{1e3 * t:13.1f}" for t in medians.values())
            print(f"{d_in:>5}->{d_out:<5} {n:>3} {cells}  {ratio:10.2f}")
    settings = {"device": args.device, "dtype": args.dtype, "tokens": args.tokens}
    save_results(args.json, {"unit": "ms, forward + backward", "settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
