"""comoe's auxiliary losses inside TRL's SFTTrainer on SmolLM2-135M-Instruct.

SFTTrainer computes its loss with a fused LM head that calls the backbone and never the model's forward;
a ComoeModel carries the auxiliary gradient on the backbone's output instead (docs/objectives.md).

    python benchmarks/trainer_aux.py [--steps 30] [--json benchmarks/results/trainer-aux.json]

1. A plain SFTTrainer and ComoeSFTTrainer train from the same initialisation on the same data: the
   adapters they end with (max abs difference), and ComoeSFTTrainer's logged loss components.
2. On one batch of the trained model: the plain SFTTrainer's gradient against the reference (TRL's task
   loss plus the weighted auxiliary loss, added by hand), and how large the auxiliary part is (what a plain
   SFTTrainer trained without before the gradient was carried).
"""

from __future__ import annotations

import tempfile
import time

import torch
from common import benchmark_parser, save_results
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from comoe.adapter.model import ComoeModel, get_comoe_model
from comoe.config import ComoeConfig
from comoe.data.prompts import render_prompt
from comoe.data.selection import load_examples
from comoe.integrations.trl import ComoeSFTTrainer
from comoe.models.loading import load_base

TASKS = ["chain_sum", "spell_backward", "letter_counting", "family_relationships", "syllogism"]


def comoe_model() -> tuple[ComoeModel, object]:
    base, tokenizer = load_base("smollm2-135m")
    torch.manual_seed(0)
    return get_comoe_model(base, ComoeConfig.preset("comoe")), tokenizer


def sft_config(folder: str, steps: int) -> SFTConfig:
    return SFTConfig(
        output_dir=folder,
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-3,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        gradient_checkpointing=False,
        max_length=256,
        disable_tqdm=True,
    )


def gradient(model: ComoeModel, loss: torch.Tensor, retain: bool = False) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return torch.cat([g.flatten() for g in filled])


def main() -> None:
    parser = benchmark_parser(__doc__, "10 steps")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    steps = 10 if args.quick else args.steps
    examples = load_examples(None, TASKS, "train", 4 * steps // len(TASKS) + 1, seed=0)
    data = Dataset.from_list([{"prompt": render_prompt(e), "completion": e.output} for e in examples])
    adapters, runs = {}, {}
    for name, trainer_class in (("SFTTrainer", SFTTrainer), ("ComoeSFTTrainer", ComoeSFTTrainer)):
        model, tokenizer = comoe_model()
        with tempfile.TemporaryDirectory() as folder:
            trainer = trainer_class(
                model=model, args=sft_config(folder, steps), train_dataset=data, processing_class=tokenizer
            )
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
        adapters[name] = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
        logs = [row for row in trainer.state.log_history if "loss" in row]
        runs[name] = {"seconds": round(seconds, 1), "log": logs}
        print(name, f"{seconds:.0f} s", logs[-1])
    difference = max(
        float((adapters["SFTTrainer"][k] - adapters["ComoeSFTTrainer"][k]).abs().max())
        for k in adapters["SFTTrainer"]
    )
    print(f"max |adapter difference| plain vs ComoeSFTTrainer: {difference:.2e}")

    with tempfile.TemporaryDirectory() as folder:
        config = sft_config(folder, steps)
        plain = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(plain.get_train_dataloader()))
    model.train()
    torch.manual_seed(1)  # the same expert-dropout masks in both calls
    got = gradient(model, plain.compute_loss(model, dict(batch)))
    torch.manual_seed(1)
    with model.caller_adds_aux_loss():
        task = plain.compute_loss(model, dict(batch))
    aux = model.weighted_aux_loss
    task_grad = gradient(model, task, retain=True)
    aux_grad = gradient(model, aux, retain=True)
    reference = gradient(model, task + aux)
    check = {
        "relative_difference_to_reference": float((got - reference).norm() / reference.norm()),
        "task_grad_norm": float(task_grad.norm()),
        "aux_grad_norm": float(aux_grad.norm()),
        "aux_over_task": float(aux_grad.norm() / task_grad.norm()),
        "contrastive": model.last_aux_losses()["contrastive"],
    }
    print(check)
    save_results(
        args.json,
        {
            "model": "smollm2-135m",
            "preset": "comoe",
            "steps": steps,
            "runs": runs,
            "max_adapter_difference": difference,
            "one_batch": check,
        },
    )


if __name__ == "__main__":
    main()
