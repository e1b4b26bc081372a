"""lm-evaluation-harness with a comoe adapter: a registered model `comoe`, and comoe tasks as lm-eval tasks.

Python:

    import lm_eval
    from comoe.integrations.lm_eval import ComoeLM
    lm_eval.simple_evaluate(model=ComoeLM(adapter="runs/demo/adapter"), tasks=["arc_easy"])

Command line (lm-eval's own CLI, with the `comoe` model registered first):

    python -m comoe.integrations.lm_eval run --model comoe --model_args adapter=runs/demo/adapter \
        --tasks arc_easy

`ComoeLM` is lm-eval's HFLM on the adapted model, so every lm-eval task and option works as for a plain
Hugging Face model; the base model comes from the adapter folder (or `pretrained=` to override it) and is
loaded as comoe loads it (built-in alias, local folder or hub id). An adapter that routes by task (routing
'task', MOELoRA) runs every request as `task=NAME` (one of its training tasks; otherwise the mean of its
tasks' gates, with a warning). Needs `pip install lm-eval`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from comoe.adapter.folder import AdapterFolder, adapter_folder
from comoe.adapter.model import task_model, task_vocabulary
from comoe.data.example import Example
from comoe.data.prompts import render_prompt
from comoe.data.record import trained_quantization
from comoe.evaluation.scoring import choice_options, option_response
from comoe.models.auto import load_adapted
from comoe.moe.routing import routed_tasks

logger = logging.getLogger(__name__)


@register_model("comoe")
class ComoeLM(HFLM):
    """lm-eval's Hugging Face model with a comoe (or PEFT) adapter folder applied: `adapter` is its path
    (as --model_args give it) or the AdapterFolder read from it."""

    def __init__(
        self,
        adapter: AdapterFolder | str,
        pretrained: str | None = None,
        task: str | None = None,
        **kwargs: Any,
    ) -> None:
        folder = adapter_folder(adapter)  # read once; a bad folder fails before the base model is loaded
        name = pretrained or folder.base_model_name_or_path
        if name is None:
            raise ValueError(
                f"{folder.path}: the adapter does not record its base model; pass pretrained=..."
            )
        # as comoe eval loads it: another base of the same shapes is named in a warning, one of other shapes
        # refused naming the recorded base, and a base the adapter was trained quantized is loaded so
        model, tokenizer = load_adapted(folder, pretrained, quantization=trained_quantization(folder.path))
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self._task_scope = contextlib.ExitStack()  # a task-routed adapter's task id for every request
        vocabulary = task_vocabulary(model)
        if vocabulary is not None:
            task_id = vocabulary.index(task) if task in vocabulary else -1
            # only task routing reads the id at inference: loramoe's tasks weigh its training loss alone
            if task_id < 0 and routed_tasks(task_model(model).comoe_config) is not None:
                logger.warning(
                    "the adapter routes by task (its tasks: %s) and task=%r is none of them: every request "
                    "uses the mean of its tasks' gates (pass task=NAME in --model_args)",
                    ", ".join(vocabulary),
                    task,
                )
            self._task_scope.enter_context(task_model(model).default_call_inputs(task_ids=[task_id]))


def write_choice_task(folder: str | Path, name: str, examples: list[Example], eos_token: str) -> Path:
    """comoe's multiple-choice examples as a local lm-eval task (`name`.yaml + `name`.jsonl in `folder`):
    the same prompts and option responses (+ eos) that `comoe eval` scores, `acc` = argmax of summed
    log-likelihoods. Evaluate with `TaskManager(include_path=folder)`. lm-eval moves the prompt's trailing
    newline into each continuation and scores it too: a constant per question, so accuracies agree."""
    folder = Path(folder)
    records = folder / f"{name}.jsonl"
    with records.open("w") as handle:
        for example in examples:
            options = choice_options(example)
            row = {
                "prompt": render_prompt(example),
                "choices": [option_response(example, o) + eos_token for o in options],
                "label": options.index(example.answer),
            }
            handle.write(json.dumps(row) + "\n")
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(records)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def main() -> None:
    """lm-eval's command line with the `comoe` model registered (importing this module registers it)."""
    cli_evaluate()


if __name__ == "__main__":
    main()
