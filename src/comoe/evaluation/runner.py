"""Evaluation runner: load a base model (with a comoe or PEFT adapter, or several adapters in turn on one
loaded base), score every example of the chosen tasks (option log-likelihood or generation), and write the
per-task report with its baselines (chance, majority answers, predicted answers, collapse warnings), its
markdown summary and plot, and with several models their paired comparison."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from comoe.adapter.folder import AdapterFolder, adapter_folder
from comoe.adapter.model import task_model, task_vocabulary
from comoe.data.example import Example, group_by_task
from comoe.data.record import trained_answers, trained_quantization, trained_template
from comoe.data.selection import SourceSettings, select_examples
from comoe.data.tasks import scoring_of
from comoe.evaluation.baselines import LETTER_OPTIONS, add_baselines, question_id
from comoe.evaluation.compare import compare_reports
from comoe.evaluation.generation import generate_responses
from comoe.evaluation.loglik import context_length, option_loglikelihoods
from comoe.evaluation.scoring import Prediction, choice_options, extract_answer, is_correct, summarise
from comoe.evaluation.settings import EvalArgs, GenerateArgs
from comoe.evaluation.summary import write_summary
from comoe.files import atomic_write_text
from comoe.models.auto import adapt_base, base_model_name, load_adapted
from comoe.models.compile import compile_blocks
from comoe.models.device import resolve_device
from comoe.models.loading import same_model
from comoe.moe.routing import warn_unseen_tasks
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
    """Score every example: 'loglik' for choice tasks (others always generate), or 'generate'. An adapter
    that reads task ids (routing 'task', the loramoe objective) scores each task's examples with the task's
    id in its vocabulary (a task outside it: -1, the mean of the known tasks' gates, with a warning)."""
    vocabulary = task_vocabulary(model)
    if vocabulary is None:
        return _predict(model, tokenizer, examples, mode, batch_size, max_new_tokens)
    predictions: list[Prediction] = [None] * len(examples)  # type: ignore[list-item]
    groups = group_by_task(examples)
    # only task routing reads the id at inference; loramoe's tasks weigh its training loss alone
    warn_unseen_tasks(task_model(model).comoe_config, groups)
    for task, indices in groups.items():
        task_id = vocabulary.index(task) if task in vocabulary else -1
        with task_model(model).default_call_inputs(task_ids=[task_id]):
            group = [examples[i] for i in indices]
            chosen = _predict(model, tokenizer, group, mode, batch_size, max_new_tokens)
            for i, prediction in zip(indices, chosen, strict=True):
                predictions[i] = prediction
    return predictions


def _predict(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    mode: str,
    batch_size: int,
    max_new_tokens: int,
) -> list[Prediction]:
    predictions: list[Prediction | None] = [None] * len(examples)
    scored = [i for i, e in enumerate(examples) if mode == "loglik" and scoring_of(e) == "choice"]
    generated = sorted(set(range(len(examples))) - set(scored))
    if scored:
        chosen = [examples[i] for i in scored]
        all_scores, cut = option_loglikelihoods(model, tokenizer, chosen, batch_size)
        for i, example, scores, truncated in zip(scored, chosen, all_scores, cut, strict=True):
            options = choice_options(example)
            best = options[max(range(len(scores)), key=scores.__getitem__)]
            predictions[i] = Prediction(
                example.task,
                example.answer,
                best,
                best == example.answer,
                truncated=truncated,
                question=question_id(example),
                options=len(options),
            )
    if generated:
        chosen = [examples[i] for i in generated]
        texts, cut = generate_responses(model, tokenizer, chosen, batch_size, max_new_tokens)
        for i, example, text, truncated in zip(generated, chosen, texts, cut, strict=True):
            kind = scoring_of(example)
            options = choice_options(example) if kind == "choice" else None
            guess = extract_answer(kind, text, options)
            correct = is_correct(kind, guess, example.answer)
            count = len(options) if options else LETTER_OPTIONS if kind == "letter" else 0
            predictions[i] = Prediction(
                example.task,
                example.answer,
                guess,
                correct,
                text,
                truncated,
                question_id(example),
                count,
                True,
            )
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
    if path.suffix in (".md", ".png"):
        raise ValueError(
            f"--output {path}: give the report's name (e.g. {path.with_suffix('.json')}); its summary (.md) "
            "and plot (.png) are written beside it"
        )
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
    """Evaluate one model (the base model, or the base with one adapter) and, with --output, write the
    report JSON with its markdown summary and plot beside it; returns the report. Several models (more
    than one --adapter, or --with-base): run_evals."""
    if len(args.adapters) > 1 or (args.with_base and args.adapters):
        raise ValueError(
            "run_eval evaluates one model; use run_evals for several (--adapter given more than once, "
            "or --with-base)"
        )
    return run_evals(args)[0][0]


def run_evals(args: EvalArgs) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Evaluate the base model (alone, or with --with-base first) and each --adapter on the same questions,
    loading the base once for all of them; returns one report per model and, for several, their paired
    comparison (compare.compare_reports, later minus earlier). With --output: the reports (one model: that
    file; several: <stem>.<label>.json each and <stem>.compare.json), and the summary <stem>.md with its
    plot <stem>.png beside them."""
    check_report_path(args.output)
    runs: list[str | None] = [*([None] if args.with_base or not args.adapters else []), *args.adapters]
    if len({Path(run).resolve() for run in args.adapters}) < len(args.adapters):
        raise ValueError(f"--adapter {' '.join(args.adapters)}: one folder is given twice")
    # data errors before the model is loaded; each adapter's questions prompted as it was trained
    examples = [eval_examples(replace(args, adapter=run, with_base=False)) for run in runs]
    folders = [adapter_folder(run) if run else None for run in runs]
    labels = model_labels(runs)
    reports = []
    if len(runs) == 1:
        model, tokenizer = load_for_eval(
            args.model, folders[0], args.dtype, args.device, eval_quantization(args)
        )
        name = base_model_name(args.model, folders[0])
        reports.append(evaluate(model, tokenizer, examples[0], args, name, runs[0], labels[0]))
    else:
        base, tokenizer, name, quantized = load_shared_base(args, [f for f in folders if f is not None])
        place = next(base.parameters()).device
        for run, folder, questions, label in zip(runs, folders, examples, labels, strict=True):
            if folder is None:
                reports.append(evaluate(base, tokenizer, questions, args, name, None, label, several=True))
                continue
            model = adapt_base(base, folder, args.model)
            model = model if quantized else model.to(place)  # a quantized base's adapter is made beside it
            reports.append(evaluate(model, tokenizer, questions, args, name, run, label, several=True))
            base = model.unload()  # the base model as it was loaded, for the next adapter
    comparison = compare_reports([[report] for report in reports], labels) if len(reports) > 1 else None
    if args.output:
        write_reports(Path(args.output), reports, labels, comparison)
    return reports, comparison


def evaluate(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    args: EvalArgs,
    model_name: str,
    adapter: str | None,
    label: str,
    several: bool = False,
) -> dict[str, Any]:
    """One model's report: per-task accuracy (summarise), the settings, its baselines and warnings (logged,
    prefixed with the model's label when `several`), and every prediction."""
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # math needs room for a chain of thought; answers elsewhere are short
        max_new_tokens = 256 if any(scoring_of(e) in ("number", "letter") for e in examples) else 32
        max_new_tokens = min(max_new_tokens, max(1, context_length(model) // 2))  # half a short context
    if args.compile:  # each model evaluated (with several adapters: each in turn on the one base)
        logger.info("compiling %d decoder blocks (torch.compile)", compile_blocks(model))
    start = time.perf_counter()
    predictions = predict(model, tokenizer, examples, args.mode, args.batch_size, max_new_tokens)
    report = summarise(predictions)
    report.update(
        label=label,
        model=model_name,
        adapter=adapter,
        data_dir=args.data_dir,
        data=args.data,
        mode=args.mode,
        limit=args.limit,
        seed=args.seed,
        max_new_tokens=max_new_tokens,
        seconds=round(time.perf_counter() - start, 1),
        warnings=[],
        examples=[vars(p) for p in predictions],
    )
    for line in add_baselines(report, trained_answers(adapter)):
        logger.warning("warning: %s%s", f"{label}: " if several else "", line)
    return report


def load_shared_base(args: EvalArgs, folders: list[AdapterFolder]) -> tuple[nn.Module, Any, str, bool]:
    """The one base model several adapters are evaluated on, its tokenizer, its name and whether it is
    quantized: --model, else the base the adapters record (they must record the same one), quantized as
    --load-in-* say, else as the adapters were trained (the same way for all)."""
    names = [base_model_name(args.model, folder) for folder in folders]
    for folder, name in zip(folders[1:], names[1:], strict=True):
        if not same_model(name, names[0]):
            raise ValueError(
                f"{folders[0].path} was trained on base model {names[0]} and {folder.path} on {name}: "
                "adapters evaluated together share one base; give --model, or evaluate them separately"
            )
    quantization = eval_quantization(args)
    if quantization == AS_TRAINED:
        recorded = [trained_quantization(folder.path) for folder in folders]
        if len(set(recorded)) > 1:
            kinds = ", ".join(
                f"{f.path}: {q or 'full precision'}" for f, q in zip(folders, recorded, strict=True)
            )
            raise ValueError(
                f"the adapters were trained on differently quantized bases ({kinds}); give --load-in-4bit, "
                "--load-in-8bit or --no quantization flag for all, or evaluate them separately"
            )
        quantization = recorded[0]
    model, tokenizer = load_for_eval(names[0], None, args.dtype, args.device, quantization)
    return model, tokenizer, names[0], quantization is not None


def model_labels(runs: list[str | None]) -> list[str]:
    """'base' for the base model; for an adapter folder the shortest end of its path, of two parts at least
    ('lora/adapter'), that tells it from the others."""
    parts = [Path(run).resolve().parts if run else ("base",) for run in runs]
    depth = 2
    while True:
        labels = ["base" if run is None else "/".join(p[-depth:]) for run, p in zip(runs, parts, strict=True)]
        if len(set(labels)) == len(labels) or depth >= max(map(len, parts)):
            return labels
        depth += 1


def report_paths(output: Path, labels: list[str]) -> list[Path]:
    """Where the reports go: `output` for one model; <stem>.<label>.json beside it for several."""
    if len(labels) == 1:
        return [output]
    safe = [re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-") or "model" for label in labels]
    return [output.with_name(f"{output.stem}.{label}{output.suffix or '.json'}") for label in safe]


def write_reports(
    output: Path, reports: list[dict[str, Any]], labels: list[str], comparison: dict[str, Any] | None
) -> None:
    """The report JSON(s), the comparison JSON (several models) and the summary .md with its .png plot."""
    for path, report in zip(report_paths(output, labels), reports, strict=True):
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    if comparison is not None:
        atomic_write_text(
            output.with_name(f"{output.stem}.compare.json"), json.dumps(comparison, indent=2) + "\n"
        )
    written = write_summary(output.with_suffix(".md"), reports, labels, comparison)
    logger.info("summary: %s (plot %s)", written[0], written[1].name)
