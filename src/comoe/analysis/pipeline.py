"""`comoe analyze`: route held-out examples through a comoe adapter, measure specialisation, write the
summary, the figures and the report."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from comoe.adapter.method import method_of
from comoe.adapter.model import task_vocabulary
from comoe.analysis.metrics import SpecialisationAccumulator, token_tasks
from comoe.analysis.plots import plot_summary
from comoe.analysis.report import specialisation_section
from comoe.analysis.settings import AnalyzeArgs
from comoe.data.collate import encode_examples, pad_batch
from comoe.data.example import task_index, vocabulary_ids
from comoe.evaluation.loglik import within_context
from comoe.evaluation.runner import eval_examples, load_for_eval
from comoe.files import atomic_write_text
from comoe.moe.routing import warn_unseen_tasks

logger = logging.getLogger(__name__)


def analyze(args: AnalyzeArgs) -> dict[str, Any]:
    """Route held-out examples (prompt and reference response) through a comoe adapter and measure."""
    examples = eval_examples(args)  # data errors before the model is loaded
    model, tokenizer = load_for_eval(args.model, args.adapter, args.dtype, args.device)
    method = method_of(model)
    if method is None or not method.has_routing:
        raise ValueError(
            f"--adapter {args.adapter}: analysis needs a comoe adapter (routing), not a PEFT one"
        )
    task_names, task_ids = task_index(examples)
    vocabulary = task_vocabulary(model)  # an adapter that reads task ids gets its own (-1 outside them)
    model_ids = vocabulary_ids(examples, vocabulary) if vocabulary is not None else None
    # id -1: one gate for all of them, so I(task; expert) cannot separate them
    warn_unseen_tasks(getattr(model, "comoe_config", None), task_names, "analysis examples")
    accumulator = SpecialisationAccumulator(method.routed_layers(model), task_names)
    device = next(model.parameters()).device
    cutoff = within_context(model, args.cutoff)  # never past the model's position embeddings
    for start in range(0, len(examples), args.batch_size):
        items, _ = encode_examples(tokenizer, examples[start : start + args.batch_size], cutoff)
        batch = {k: v.to(device) for k, v in pad_batch(items, tokenizer.pad_token_id).items()}
        rows = torch.tensor(task_ids[start : start + args.batch_size], device=device)
        inputs = {}
        if model_ids is not None:
            inputs["task_ids"] = torch.tensor(model_ids[start : start + args.batch_size], device=device)
        with torch.no_grad(), method.record_routing(model) as records:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **inputs)
            accumulator.update(records, token_tasks(rows, batch["attention_mask"]), batch["input_ids"])
    summary = accumulator.summary()
    summary.update(
        model=args.model or model.base_model_name_or_path,  # by default the base the adapter records
        adapter=args.adapter,
        data_dir=args.data_dir,
        data=args.data,
        limit=args.limit,
        examples=len(examples),
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    figures = plot_summary(summary, out)
    atomic_write_text(out / "report.md", specialisation_section(summary, figures))
    return summary
