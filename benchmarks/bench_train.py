"""Training speed of the whole loop: `comoe train` (lora and comoe presets) against what a user would
otherwise run, transformers Trainer + PEFT LoRA, on the same examples, batch size, cutoff and LoRA.

Every candidate trains the same seeded sample of the built-in tasks for the same number of optimizer
steps (AdamW, linear schedule, clipping at 1.0), in its own process, rounds interleaved. Measured per
optimizer step (forward, backward, clipping, optimizer; the first steps are warm-up and dropped): seconds
and real (non-padding) tokens per second. comoe's come from its own log.jsonl (`step_s`,
`batch_tokens`); Trainer's from a callback around each step and a collator that counts tokens.

- comoe-lora: `comoe train --preset lora` (PEFT LoRA of the matched rank inside comoe's loop);
- comoe: `comoe train --preset comoe` (top-2 of 4 experts + the CoMoE loss);
- trainer-peft: Trainer + `get_peft_model(model, <the same LoraConfig>)`.

Routing statistics (--stats-steps) are off for the comoe runs: they cost one extra pass every 10 steps by
default and Trainer has no counterpart.

    python benchmarks/bench_train.py [--quick] [--json FILE] [--model NAME_OR_FOLDER]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import benchmark_parser, save_results
from datasets import Dataset
from peft import get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from comoe.adapter.lora import matched_lora_config
from comoe.data.collate import encode_examples
from comoe.data.selection import load_examples
from comoe.models.loading import load_base
from comoe.training.loop import train
from comoe.training.settings import TrainArgs

TASKS = ["chain_sum", "spell_backward", "letter_counting", "family_relationships", "syllogism"]
CANDIDATES = ["comoe-lora", "comoe", "trainer-peft"]
WARMUP = 2  # steps dropped from every run (allocations, first optimizer state)


def run_comoe(preset: str, args: argparse.Namespace, folder: Path) -> tuple[list[float], list[int]]:
    output = folder / preset
    train(
        TrainArgs(
            model=args.model,
            preset=preset,
            tasks=TASKS,
            train_limit=args.limit,
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            cutoff=args.cutoff,
            save_steps=0,
            stats_steps=0,
            output=str(output),
        )
    )
    rows = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [r["step_s"] for r in rows], [r["batch_tokens"] for r in rows]


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step, from its start to its end (after the optimizer and scheduler)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def run_trainer(args: argparse.Namespace, folder: Path) -> tuple[list[float], list[int]]:
    base, tokenizer = load_base(args.model)
    examples = load_examples(None, TASKS, "train", args.limit, 0)
    items, _ = encode_examples(tokenizer, examples, args.cutoff)
    dataset = Dataset.from_dict(
        {"input_ids": [i.input_ids for i in items], "labels": [i.labels for i in items]}
    )
    same_as_comoe = TrainArgs(model=args.model, preset="lora").comoe_config()  # what --preset lora uses
    model = get_peft_model(base, matched_lora_config(same_as_comoe, base))
    padder = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    tokens: list[int] = []

    def collate(features):
        batch = padder(features)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    timer = StepTimer()
    settings = TrainingArguments(
        output_dir=str(folder / "trainer"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=min(10, args.steps),
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(
        model=model, args=settings, train_dataset=dataset, data_collator=collate, callbacks=[timer]
    ).train()
    return timer.seconds, tokens[: len(timer.seconds)]


def run_one(candidate: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        if candidate == "trainer-peft":
            seconds, tokens = run_trainer(args, Path(folder))
        else:
            seconds, tokens = run_comoe("lora" if candidate == "comoe-lora" else "comoe", args, Path(folder))
    seconds, tokens = seconds[WARMUP:], tokens[WARMUP:]
    return {
        "candidate": candidate,
        "step_s": seconds,
        "median_step_s": statistics.median(seconds),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "tokens_per_step": statistics.mean(tokens),
    }


def main() -> None:
    parser = benchmark_parser(__doc__, "6 steps of batch 2, one round (< 1 minute)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--limit", type=int, default=40, help="examples per task")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", choices=CANDIDATES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.limit, args.rounds = 6, 2, 4, 1
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    runs: dict[str, list[dict]] = {c: [] for c in CANDIDATES}
    for _ in range(args.rounds):  # interleaved: drift on a shared machine hits every candidate alike
        for candidate in CANDIDATES:
            command = [sys.executable, __file__, "--one", candidate, *sys.argv[1:]]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[candidate].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for candidate, results in runs.items():
        steps = [s for r in results for s in r["step_s"]]
        rows.append(
            {
                "candidate": candidate,
                "median_step_s": statistics.median(steps),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
                "tokens_per_step": statistics.mean(r["tokens_per_step"] for r in results),
                "steps_measured": len(steps),
            }
        )
    baseline = next(r for r in rows if r["candidate"] == "trainer-peft")
    for row in rows:
        row["step_over_trainer_peft"] = row["median_step_s"] / baseline["median_step_s"]
        row["tokens_per_s_over_trainer_peft"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        print(
            f"{row['candidate']:13s} {1e3 * row['median_step_s']:7.0f} ms/step"
            f"  {row['tokens_per_s']:6.0f} tok/s  ({row['tokens_per_step']:.0f} tokens/step)"
            f"  x{row['step_over_trainer_peft']:.2f} of Trainer+PEFT"
        )
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "one")}
    save_results(args.json, {"settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
