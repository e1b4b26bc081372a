"""`comoe generate`: greedy responses to your prompts, prompted the way the adapter was trained (the
template its folder records: the chat template, Alpaca, or the bare text)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn

from comoe.adapter.folder import AdapterFolder, adapter_folder
from comoe.adapter.model import task_model
from comoe.data.example import Example
from comoe.data.formats import Messages, nonempty_field, parse_messages
from comoe.data.record import trained_template
from comoe.evaluation.generation import generate_responses
from comoe.evaluation.runner import eval_quantization, load_for_eval
from comoe.evaluation.settings import GENERATED_ROW, GenerateArgs
from comoe.files import atomic_write_text
from comoe.models.compile import compile_blocks
from comoe.moe.routing import routed_tasks, routing_task_id, warn_unseen_tasks
from comoe.settings import locate
from comoe.validation import InvalidSetting

PROMPT_TASK = "prompt"  # the task the prompts are tagged with
logger = logging.getLogger(__name__)


def read_prompts(args: GenerateArgs) -> list[Any]:
    """The prompts of `read_prompt_rows`, without their tasks."""
    return read_prompt_rows(args)[0]


def read_prompt_rows(args: GenerateArgs) -> tuple[list[Any], list[str | None]]:
    """The prompts and each one's task: --prompt, or a .txt file (one per non-empty line), or a .jsonl file
    (rows with `prompt`, a non-empty string, or `messages`, a conversation ending with the user's turn; and
    optionally `task`, a non-empty string, as in training data); a file of none is refused. The task is None
    where a row gives none (--prompt and .txt lines never do)."""
    if args.prompt is not None:
        return [args.prompt], [None]
    path = Path(args.prompts or "")
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts {path}: not valid UTF-8 (byte {error.start})") from None
    tasks: list[str | None] = []
    if path.suffix.lower() != ".jsonl":
        prompts: list[Any] = [line for line in lines if line.strip()]
        tasks = [None] * len(prompts)
    else:
        prompts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"--prompts {path}: line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                prompts.append(nonempty_field(row, "prompt", where))
            elif isinstance(row, dict) and "messages" in row:
                prompts.append(prompt_messages(row["messages"], where))
            else:
                raise ValueError(f"{where}: expected an object with 'prompt' (a string) or 'messages'")
            tasks.append(None if row.get("task") is None else nonempty_field(row, "task", where))
    if not prompts:
        expected = "one JSON row per line" if path.suffix.lower() == ".jsonl" else "one prompt per line"
        raise ValueError(f"--prompts {path}: no prompts (the file is empty or blank); expected {expected}")
    return prompts, tasks


def prompt_messages(turns: Any, where: str) -> Messages:
    """A conversation to answer: checked turn by turn, and ending with the user's turn, the one the model
    answers (docs/data.md)."""
    messages = parse_messages(turns, where, need_assistant=False)
    role = messages[-1][0]
    if role != "user":
        raise ValueError(
            f"{where}: the conversation ends with {'an' if role == 'assistant' else 'a'} {role} turn; a "
            "prompt ends with the user's turn, which the model answers"
        )
    return messages


def prompt_example(prompt: Any, template: str) -> Example:
    """A prompt as an example of the prompt task, rendered with `template` (a conversation needs the chat
    template)."""
    if isinstance(prompt, tuple):
        if template != "chat":
            raise ValueError(f"a messages prompt needs --template chat (got {template!r})")
        return Example(PROMPT_TASK, prompt[-1][1], "", "", "", messages=prompt, template=template)
    return Example(PROMPT_TASK, prompt, "", "", "", messages=(("user", prompt),), template=template)


def unknown_task(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Prompts given no --task and no row task: an adapter routed by task (routing 'task') routes them as a
    task outside its vocabulary (id -1: the mean of the known tasks' gates), with one warning naming --task,
    the rows' `task` field and the tasks; others are unchanged."""
    vocabulary = routed_tasks(getattr(task_model(model), "comoe_config", None))
    if vocabulary is None:
        return contextlib.nullcontext()
    logger.warning(
        "prompts carry no task: the adapter routes by task and uses the mean of its tasks' gates; pass "
        "--task NAME, or give each --prompts JSONL row a 'task', to route them as one of its tasks (%s)",
        ", ".join(vocabulary),
    )
    return task_model(model).default_call_inputs(task_ids=[-1])


def row_task_ids(model: nn.Module, tasks: list[str | None]) -> list[int] | None:
    """Each prompt's id in the task vocabulary of an adapter routed by task (-1: a task outside it, with the
    warning comoe eval gives, moe.routing.warn_unseen_tasks; or a row without a task, warned of with their
    count), when some row carries a task; None otherwise: no row names a task, or the adapter does not
    route by task (there a row's task is just data)."""
    config = getattr(task_model(model), "comoe_config", None)
    vocabulary = routed_tasks(config)
    if vocabulary is None or all(task is None for task in tasks):
        return None
    warn_unseen_tasks(config, [task for task in tasks if task is not None], "prompts")
    untagged = tasks.count(None)
    if untagged:
        logger.warning(
            "%d of %d prompts carry no task: they use the mean of the adapter's tasks' gates; give their "
            "rows a 'task' (one of %s)",
            untagged,
            len(tasks),
            ", ".join(vocabulary),
        )
    return [vocabulary.index(task) if task in vocabulary else -1 for task in tasks]


def check_task(args: GenerateArgs, folder: AdapterFolder | None) -> None:
    """--task names one of the tasks the adapter folder routes by (moe.routing.routing_task_id), checked
    from its config before the base model loads; InvalidSetting naming the flag (or YAML file) otherwise."""
    if args.task is None:
        return
    try:
        routing_task_id(folder.config if folder is not None else None, args.task)
    except InvalidSetting as error:
        raise locate(args, error) from None


def run_generate(args: GenerateArgs) -> list[dict[str, Any]]:
    """Generate, then print the JSONL rows {prompt, response, truncated} or write them to args.output."""
    prompts, tasks = read_prompt_rows(args)
    template = args.template
    if template == "auto":
        template = (trained_template(args.adapter) if args.adapter else None) or "none"
    examples = [prompt_example(prompt, template) for prompt in prompts]
    folder = adapter_folder(args.adapter) if args.adapter is not None else None
    check_task(args, folder)
    model, tokenizer = load_for_eval(args.model, folder, args.dtype, args.device, eval_quantization(args))
    if args.compile:
        logger.info("compiling %d decoder blocks (torch.compile)", compile_blocks(model))
    task_ids = row_task_ids(model, tasks) if args.task is None else None
    if args.task is not None and any(task is not None for task in tasks):
        logger.info("--task %s routes every prompt; the prompts rows' own tasks are not used", args.task)
    with unknown_task(model) if args.task is None and task_ids is None else contextlib.nullcontext():
        texts, cut = generate_responses(
            model, tokenizer, examples, args.batch_size, args.max_new_tokens, args.task, task_ids
        )
    rows = [
        dict(zip(GENERATED_ROW, ([list(t) for t in p] if isinstance(p, tuple) else p, text, c), strict=True))
        for p, text, c in zip(prompts, texts, cut, strict=True)
    ]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return rows
