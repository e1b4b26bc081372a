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
from comoe.moe.routing import routed_tasks, routing_task_id
from comoe.settings import locate
from comoe.validation import InvalidSetting

PROMPT_TASK = "prompt"  # the task the prompts are tagged with
logger = logging.getLogger(__name__)


def read_prompts(args: GenerateArgs) -> list[Any]:
    """The prompts: --prompt, or a .txt file (one per non-empty line) or .jsonl file (rows with `prompt`,
    a non-empty string, or `messages`, a conversation ending with the user's turn); a file of none is
    refused."""
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts or "")
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"--prompts {path}: not valid UTF-8 (byte {error.start})") from None
    if path.suffix.lower() != ".jsonl":
        prompts: list[Any] = [line for line in lines if line.strip()]
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
    if not prompts:
        expected = "one JSON row per line" if path.suffix.lower() == ".jsonl" else "one prompt per line"
        raise ValueError(f"--prompts {path}: no prompts (the file is empty or blank); expected {expected}")
    return prompts


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
    """Prompts given no --task: an adapter routed by task (routing 'task') routes them as a task outside its
    vocabulary (id -1: the mean of the known tasks' gates), with one warning naming --task and the tasks;
    others are unchanged."""
    vocabulary = routed_tasks(getattr(task_model(model), "comoe_config", None))
    if vocabulary is None:
        return contextlib.nullcontext()
    logger.warning(
        "prompts carry no task: the adapter routes by task and uses the mean of its tasks' gates; pass "
        "--task NAME to route them as one of its tasks (%s)",
        ", ".join(vocabulary),
    )
    return task_model(model).default_call_inputs(task_ids=[-1])


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
    prompts = read_prompts(args)
    template = args.template
    if template == "auto":
        template = (trained_template(args.adapter) if args.adapter else None) or "none"
    examples = [prompt_example(prompt, template) for prompt in prompts]
    folder = adapter_folder(args.adapter) if args.adapter is not None else None
    check_task(args, folder)
    model, tokenizer = load_for_eval(args.model, folder, args.dtype, args.device, eval_quantization(args))
    if args.compile:
        logger.info("compiling %d decoder blocks (torch.compile)", compile_blocks(model))
    with unknown_task(model) if args.task is None else contextlib.nullcontext():
        texts, cut = generate_responses(
            model, tokenizer, examples, args.batch_size, args.max_new_tokens, task=args.task
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
