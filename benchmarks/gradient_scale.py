"""How large is the contrastive gradient against the task gradient? The measurement behind the norm floor.

SmolLM2-135M with the comoe preset, one batch of 4 training examples (LLM-Adapters boolq/ARC/OBQA when the
data is there, else the built-in tasks): the norms of the adapter gradients of the task loss and of
0.01 x the contrastive loss, at initialisation (B = 0) and after one AdamW step (most experts non-zero, a
few still at B = 0 because no token was routed to them), for several `contrastive_norm_floor` values
(0 = the paper's plain cosine).

    python benchmarks/gradient_scale.py [--floors 0,1e-4,1e-3,1e-2] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from common import save_results

from comoe import ComoeConfig, get_comoe_model
from comoe.data.collate import encode_examples, pad_batch
from comoe.data.selection import load_examples
from comoe.models import load_base
from comoe.training.loss import response_loss

DATA = Path(
    os.environ.get("COMOE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared/data/llm-adapters")
)


def grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def measure(floor: float, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    base, _ = load_base("smollm2-135m")
    torch.manual_seed(0)
    model = get_comoe_model(base, ComoeConfig.preset("comoe", contrastive_norm_floor=floor, lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    result = {}
    for stage in ("init", "after_1_step"):
        task, aux = response_loss(model, batch)
        contrastive = model.weighted_aux_loss  # 0.01 x contrastive (no balance loss in the comoe preset)
        zero = sum(
            int((layer.lora_B.abs().amax(dim=(1, 2)) == 0).sum()) for layer in model.comoe_layers().values()
        )
        result[stage] = {
            "task_grad_norm": grad_norm(task, params),
            "weighted_contrastive_grad_norm": grad_norm(contrastive, params),
            "contrastive": model.last_aux_losses()["contrastive"],
            "experts_at_zero_B": zero,
        }
        optimizer.zero_grad()
        (task + aux).backward()
        optimizer.step()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--floors", default="0,1e-4,1e-3,1e-2")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    _, tokenizer = load_base("smollm2-135m")
    if DATA.is_dir():
        examples = load_examples(
            DATA, ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"], "train", 1, seed=0
        )
    else:
        examples = load_examples(
            None, ["chain_sum", "syllogism", "spell_backward", "letter_counting"], "train", 1
        )
    items, _ = encode_examples(tokenizer, examples, 256)
    batch = pad_batch(items, tokenizer.pad_token_id)
    results = {}
    for floor in [float(f) for f in args.floors.split(",")]:
        results[str(floor)] = measure(floor, batch)
        for stage, row in results[str(floor)].items():
            ratio = row["weighted_contrastive_grad_norm"] / max(row["task_grad_norm"], 1e-30)
            print(
                f"floor {floor:<7g} {stage:13s} |grad task| {row['task_grad_norm']:9.4f}  "
                f"|grad 0.01*contrastive| {row['weighted_contrastive_grad_norm']:11.4f}  ratio {ratio:9.3g}  "
                f"experts at B=0: {row['experts_at_zero_B']}"
            )
    save_results(args.json, {"examples": [e.task for e in examples], "floors": results})


if __name__ == "__main__":
    main()
