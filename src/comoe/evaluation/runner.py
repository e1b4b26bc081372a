"""Evaluation runner: load a base model (with a comoe or PEFT adapter), score every example of the chosen
tasks (option log-likelihood or generation), and write the per-task report."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from comoe.adapter.folder import AdapterFolder, adapter_folder
from comoe.data.example import Example
from comoe.data.record import trained_quantization, trained_template
from comoe.data.selection import SourceSettings, select_examples
from comoe.data.tasks import scoring_of
from comoe.evaluation.generation import generate_responses
from comoe.evaluation.loglik import context_length, option_loglikelihoods
from comoe.evaluation.scoring import Prediction, choice_options, extract_answer, is_correct, summarise
from comoe.evaluation.settings import EvalArgs, GenerateArgs
from comoe.files import atomic_write_text
from comoe.models.auto import base_model_name, load_adapted
from comoe.models.device import resolve_device
from comoe.settings import quantization_of, quantization_unset

logger = logging.getLogger(__name__)


def predict(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    mode: str,
    batch_size: int = 8,
    max_new_tokens: int = 32,
) -> list[Prediction]:
    """Score every example: 'loglik' for choice tasks (others always generate), or 'generate'."""
    predictions: list[Prediction | None] = [None] * len(examples)
    scored = [i for i, e in enumerate(examples) if mode == "loglik" and scoring_of(e) == "choice"]
    generated = sorted(set(range(len(examples))) - set(scored))
    if scored:
        chosen = [examples[i] for i in scored]
        all_scores, cut = option_loglikelihoods(model, tokenizer, chosen, batch_size)
        for i, example, scores, truncated in zip(scored, chosen, all_scores, cut, strict=True):
            best = choice_options(example)[max(range(len(scores)), key=scores.__getitem__)]
            predictions[i] = Prediction(
                example.task, example.answer, best, best == example.answer, truncated=truncated
            )
    if generated:
        chosen = [examples[i] for i in generated]
        texts, cut = generate_responses(model, tokenizer, chosen, batch_size, max_new_tokens)
        for i, example, text, truncated in zip(generated, chosen, texts, cut, strict=True):
            kind = scoring_of(example)
            options = choice_options(example) if kind == "choice" else None
            guess = extract_answer(kind, text, options)
            correct = is_correct(kind, guess, example.answer)
            predictions[i] = Prediction(example.task, example.answer, guess, correct, text, truncated)
    return predictions  # type: ignore[return-value]


# load_for_eval's quantization: as the adapter folder's data record says (none without a record).
AS_TRAINED = "as-trained"


def load_for_eval(
    model_name: str | None,
    adapter: AdapterFolder | str | None,
    dtype: str = "float32",
    device: str = "auto",
    quantization: str | None = AS_TRAINED,
) -> tuple[nn.Module, Any]:
    """The base model (in `dtype`, on `device`), with a comoe or PEFT adapter folder applied when given
    (its path, or the AdapterFolder read from it).

    `model_name` None is the base the adapter records (else smollm2-135m); another base is named in a
    warning when the adapter fits it, and refused naming the recorded one when not (models.auto.
    load_adapted). `quantization` is '4bit', '8bit', None (full precision) or AS_TRAINED. The adapter
    folder (read once, here) and the device are checked before the (slower) base model is loaded, so a bad
    path or a missing GPU fails fast.
    """
    folder = adapter_folder(adapter) if adapter is not None else None
    place = resolve_device(device)
    if quantization == AS_TRAINED:
        quantization = trained_quantization(folder.path) if folder is not None else None
        if quantization is not None:
            logger.info("loading the base quantized to %s, as %s was trained", quantization, folder.path)
    model, tokenizer = load_adapted(
        folder, model_name, dtype=getattr(torch, dtype), quantization=quantization, device=place
    )
    # a quantized base was loaded onto `place` (bitsandbytes quantizes there) and its adapter made beside it
    return (model if quantization else model.to(place)), tokenizer


def eval_quantization(args: EvalArgs | GenerateArgs) -> str | None:
    """The quantization --load-in-4bit / --load-in-8bit ask for, or AS_TRAINED when neither is given."""
    return AS_TRAINED if quantization_unset(args) else quantization_of(args)


def check_report_path(output: str | None) -> None:
    """Refuse an output the report could not be written to, before hours of evaluation are spent."""
    if output is None:
        return
    path = Path(output)
    if path.is_dir():
        raise IsADirectoryError(
            f"--output {path} is a folder; give the report's file name (e.g. {path}/eval.json)"
        )
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise NotADirectoryError(f"--output {path}: {parent} is a file, not a folder")
    if parent is not None and not os.access(parent, os.W_OK):
        raise PermissionError(f"--output {path}: {parent} is not writable")


class HeldOutArgs(SourceSettings, Protocol):
    """The settings that choose held-out examples (EvalArgs, AnalyzeArgs): where they come from, the
    adapter whose trained template prompts --data records, and the per-task sample."""

    adapter: str | None
    limit: int | None
    seed: int


def eval_examples(args: HeldOutArgs) -> list[Example]:
    """The examples to score (select_examples): --data files (their 'test' split for datasets folders),
    prompted with --template, or under 'auto' with the template the adapter was trained with where the
    records allow it; else the LLM-Adapters or built-in tasks."""
    split = getattr(args, "split", "test")  # analysis routes test examples
    trained = trained_template(args.adapter) if args.data and args.adapter else None
    return select_examples(args, split, args.limit, args.seed, auto_template=trained)


def run_eval(args: EvalArgs) -> dict[str, Any]:
    """Evaluate and (optionally) write the report JSON; returns it."""
    check_report_path(args.output)
    examples = eval_examples(args)  # data errors before the model is loaded
    folder = adapter_folder(args.adapter) if args.adapter else None
    quantization = eval_quantization(args)
    model, tokenizer = load_for_eval(args.model, folder, args.dtype, args.device, quantization)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # math needs room for a chain of thought; answers elsewhere are short
        max_new_tokens = 256 if any(scoring_of(e) in ("number", "letter") for e in examples) else 32
        max_new_tokens = min(max_new_tokens, max(1, context_length(model) // 2))  # half a short context
    start = time.perf_counter()
    predictions = predict(model, tokenizer, examples, args.mode, args.batch_size, max_new_tokens)
    report = summarise(predictions)
    report.update(
        model=base_model_name(args.model, folder),
        adapter=args.adapter,
        data_dir=args.data_dir,
        data=args.data,
        mode=args.mode,
        limit=args.limit,
        seed=args.seed,
        max_new_tokens=max_new_tokens,
        seconds=round(time.perf_counter() - start, 1),
        examples=[vars(p) for p in predictions],
    )
    if args.output:
        atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    return report
