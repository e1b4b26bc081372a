"""Evaluation speed: comoe's multiple-choice scoring against lm-evaluation-harness on the same model,
adapter, questions and prompts; and generation with an adapter against the base model's own generate.

Log-likelihood (per task, questions/s, interleaved medians):
- comoe: `comoe eval`'s scoring (each prompt encoded once, options scored from its KV cache);
- comoe-plain: the same without the prompt cache (prompt + option once per option, as before);
- lm-eval: lm-evaluation-harness's HFLM on the same model object, through a local task whose documents
  are the same prompts and option responses (LLM-Adapters test files), `acc` = argmax of summed
  log-likelihoods: the same rule as comoe's. The accuracies must agree (asserted), and the largest
  per-option log-likelihood difference is reported.

Generation (tokens/s, every row forced to max_new_tokens): the comoe-adapted model, a PEFT LoRA of the
matched rank, and the base model, each through `model.generate` on the same left-padded batch.

    python benchmarks/bench_eval.py [--quick] [--json FILE] [--device cuda --dtype bfloat16]
                                    [--random-init]   # SmolLM2's architecture and tokenizer, random weights

The adapter is the comoe preset with its B matrices drawn at random (so that the experts change every
score) unless --adapter names a trained folder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import (
    add_device_flags,
    benchmark_parser,
    interleaved_medians,
    load_model,
    save_results,
    synchronize,
)
from lm_eval import evaluator
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager, get_task_dict
from peft import get_peft_model

from comoe.adapter.auto import load_adapter
from comoe.adapter.lora import matched_lora_config
from comoe.adapter.model import get_comoe_model
from comoe.config import ComoeConfig
from comoe.data.collate import prompt_ids
from comoe.data.prompts import render_prompt
from comoe.data.selection import load_examples
from comoe.evaluation.generation import left_pad
from comoe.evaluation.loglik import option_loglikelihoods
from comoe.evaluation.scoring import choice_options
from comoe.integrations.lm_eval import write_choice_task

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters"
TASKS = ["ARC-Challenge", "boolq"]  # 4-5 options and 2 options


def build_models(args: argparse.Namespace):
    """The adapted model under test and its tokenizer."""
    base, tokenizer = load_model(args.model, args.dtype, args.device, args.random_init)
    if args.adapter:
        return load_adapter(base, args.adapter).eval(), tokenizer
    model = get_comoe_model(base, ComoeConfig.preset("comoe", lora_dropout=0.0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            noise = torch.randn(layer.lora_B.shape, generator=generator) * 0.02
            layer.lora_B.copy_(noise.to(layer.lora_B.device, layer.lora_B.dtype))
    return model.eval(), tokenizer


def bench_loglik(model, tokenizer, task: str, args: argparse.Namespace, folder: Path) -> dict:
    examples = load_examples(args.data_dir, [task], "test", args.limit, 0)
    name = "comoe_bench_" + task.lower().replace("-", "_")
    write_choice_task(folder, name, examples, tokenizer.eos_token)
    manager = TaskManager(include_path=str(folder))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=2048)
    outputs: dict[str, object] = {}

    def comoe(cache: bool):
        scores, _ = option_loglikelihoods(model, tokenizer, examples, args.batch_size, prompt_cache=cache)
        outputs["cached" if cache else "plain"] = scores

    def harness():
        outputs["lm-eval"] = evaluator.evaluate(
            lm=lm, task_dict=get_task_dict([name], manager), log_samples=True, verbosity="ERROR"
        )

    seconds = interleaved_medians(
        {"comoe": lambda: comoe(True), "comoe-plain": lambda: comoe(False), "lm-eval": harness},
        args.repeats,
    )
    scores = outputs["cached"]
    harness_out = outputs["lm-eval"]
    samples = sorted(harness_out["samples"][name], key=lambda s: s["doc_id"])
    harness_scores = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    # lm-eval moves the prompt's trailing newline into every continuation and scores it too, so its
    # per-option values exceed comoe's by log p(newline | prompt): the same for every option of a
    # question. What must hold is that this offset is constant within each question.
    offsets = [
        [h - c for c, h in zip(ours, theirs, strict=True)]
        for ours, theirs in zip(scores, harness_scores, strict=True)
    ]
    spread = max(max(o) - min(o) for o in offsets)
    plain_gap = max(
        abs(a - b) for q, p in zip(scores, outputs["plain"], strict=True) for a, b in zip(q, p, strict=True)
    )

    def accuracy(per_question):
        right = [
            choice_options(e)[max(range(len(s)), key=s.__getitem__)] == e.answer
            for e, s in zip(examples, per_question, strict=True)
        ]
        return sum(right) / len(right)

    accuracies = {
        "comoe": accuracy(scores),
        "comoe-plain": accuracy(outputs["plain"]),
        "lm-eval": harness_out["results"][name]["acc,none"],
    }
    return {
        "task": task,
        "questions": len(examples),
        "options": sum(len(choice_options(e)) for e in examples),
        "seconds": seconds,
        "questions_per_s": {k: len(examples) / v for k, v in seconds.items()},
        "speedup_over_lm_eval": seconds["lm-eval"] / seconds["comoe"],
        "speedup_over_plain": seconds["comoe-plain"] / seconds["comoe"],
        "accuracy": accuracies,
        "lm_eval_offset_spread": spread,  # max over questions of (max - min) option offset
        "lm_eval_offset_median": statistics.median(o for row in offsets for o in row),
        "max_loglik_gap_plain": plain_gap,
    }


def bench_generate(model, tokenizer, args: argparse.Namespace) -> dict:
    """Tokens/s of generate: the comoe adapter vs PEFT LoRA (matched rank) vs the base model."""
    examples = load_examples(args.data_dir, ["boolq"], "test", args.gen_batch, 1)
    prompts = [prompt_ids(tokenizer, render_prompt(e)) for e in examples]
    batch = left_pad(prompts, tokenizer.pad_token_id, torch.device(args.device))
    new = args.max_new_tokens

    def generate(target) -> None:
        with torch.no_grad():
            target.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        synchronize()

    config = model.comoe_config
    seconds = interleaved_medians({"comoe": lambda: generate(model)}, args.repeats)
    base = model.unload()  # the original linears back: the same base model for the other two
    lora = get_peft_model(base, matched_lora_config(config, base))
    seconds.update(interleaved_medians({"peft-lora": lambda: generate(lora)}, args.repeats))
    base = lora.unload()
    seconds.update(interleaved_medians({"base": lambda: generate(base)}, args.repeats))
    tokens = len(prompts) * new
    return {
        "batch": len(prompts),
        "new_tokens": new,
        "seconds": seconds,
        "tokens_per_s": {k: tokens / v for k, v in seconds.items()},
        "comoe_over_base": seconds["comoe"] / seconds["base"],
        "comoe_over_peft_lora": seconds["comoe"] / seconds["peft-lora"],
    }


def main() -> None:
    parser = benchmark_parser(__doc__, "6 questions a task, 1 repeat (~1 min)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", help="a trained comoe adapter folder (default: a random comoe preset)")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--limit", type=int, default=60, help="questions per task")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward (both tools)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    add_device_flags(parser)
    args = parser.parse_args()
    if args.quick:
        args.limit, args.repeats, args.gen_batch, args.max_new_tokens = 6, 1, 2, 8
    if not Path(args.data_dir).is_dir():
        sys.exit(f"LLM-Adapters data not found at {args.data_dir}: pass --data-dir")
    model, tokenizer = build_models(args)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for task in TASKS:
            row = bench_loglik(model, tokenizer, task, args, Path(folder))
            rows.append(row)
            print(
                f"{task:14s} {row['questions']} questions ({row['options']} options): "
                + "  ".join(f"{k} {v:.2f} q/s" for k, v in row["questions_per_s"].items())
                + f"  -> x{row['speedup_over_lm_eval']:.2f} of lm-eval,"
                f" x{row['speedup_over_plain']:.2f} of plain; accuracy {row['accuracy']};"
                f" lm-eval offset {row['lm_eval_offset_median']:.3f}"
                f" (spread {row['lm_eval_offset_spread']:.1e}),"
                f" plain gap {row['max_loglik_gap_plain']:.1e}"
            )
            row["accuracies_agree"] = len(set(row["accuracy"].values())) == 1
    generation = bench_generate(model, tokenizer, args)
    print(
        f"generate {generation['batch']} x {generation['new_tokens']} tokens: "
        + "  ".join(f"{k} {v:.0f} tok/s" for k, v in generation["tokens_per_s"].items())
    )
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    save_results(
        args.json,
        {
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "device": device,
            "loglik": rows,
            "generate": generation,
            "median_speedup_over_lm_eval": statistics.median(r["speedup_over_lm_eval"] for r in rows),
        },
    )
    differ = [r["task"] for r in rows if not r["accuracies_agree"]]
    if differ and args.dtype == "float32":  # in bf16, batch composition alone can flip a near-tie
        sys.exit(f"accuracies differ on {', '.join(differ)}: the scoring paths disagree")


if __name__ == "__main__":
    main()
