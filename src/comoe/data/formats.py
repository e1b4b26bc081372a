"""Record formats of user data: which one a record is in, and the Example it becomes under a template.

Three formats, as PEFT/TRL, MoE-PEFT and torchtune users keep their data:
- instruction: {instruction, input?, output, answer?} (Alpaca / LLM-Adapters);
- prompt_completion: {prompt, completion} (TRL's prompt-completion datasets);
- messages: {messages: [{role, content}, ...]} (conversations; roles system, user, assistant).
Any record may also carry `task` (what per-task metrics and routing analysis group by), `answer` (the gold
answer evaluation compares against; default: the response) and `choices` (a multiple-choice item's
options, `answer` being one of them). Every check names the record and the field, since a user fixes a
file by its line, not by a Python traceback.
"""

from __future__ import annotations

import re
from typing import Any

from comoe.data.chat import ROLES
from comoe.data.example import Example
from comoe.data.templates import plain_prompt

FORMATS = ("instruction", "prompt_completion", "messages")
# The fields that identify a format, all required (instruction records may add `input`).
REQUIRED = {
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}
RESPONSES = ("output", "completion")  # optional when a record gives `answer` (evaluation items)
# The template each format is trained with unless --template says otherwise: Alpaca for instruction
# records (the papers' format), plain concatenation for prompt/completion, the chat template for messages.
DEFAULT_TEMPLATE = {"instruction": "alpaca", "prompt_completion": "none", "messages": "chat"}


_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")


def answer_format_options(instruction: str) -> list[str] | None:
    """The option words of an LLM-Adapters commonsense instruction ('... Answer format: a/b/c'), or None."""
    match = _ANSWER_FORMAT.search(instruction.strip())
    return match.group(1).split("/") if match else None


def record_format(record: Any, where: str) -> str:
    """The format of one record, from the fields it fills (a field that is null counts as absent)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with fields, got {type(record).__name__}")
    present = {key for key, value in record.items() if value is not None}
    found = [name for name in FORMATS if any(key in present for key in REQUIRED[name])]
    if len(found) != 1:
        expected = "; ".join(f"{name}: {', '.join(REQUIRED[name])}" for name in FORMATS)
        has = ", ".join(sorted(present)) or "none"
        reason = "fields of several formats" if found else "no known format"
        raise ValueError(f"{where}: {reason} (fields: {has}); expected one of {expected}")
    name = found[0]
    # An evaluation item may give only its answer (with choices, or scored by match): it is the response.
    missing = [
        key for key in REQUIRED[name] if key not in present and not (key in RESPONSES and "answer" in present)
    ]
    if missing:
        raise ValueError(f"{where}: the record lacks field(s) {missing} of the {name} format")
    return name


def _text(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"{where}: field {key!r} is missing")
        return ""
    if not isinstance(value, str):  # never train on "None", "{'x': 1}" or "nan"
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def _nonempty(record: dict[str, Any], key: str, where: str) -> str:
    value = _text(record, key, where)
    if not value.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return value


def _response(record: dict[str, Any], key: str, where: str) -> str:
    """The response field, or the answer for an evaluation item that gives only that."""
    if record.get(key) is None and record.get("answer") is not None:
        return _nonempty(record, "answer", where)
    return _nonempty(record, key, where)


def parse_messages(turns: Any, where: str, need_assistant: bool = True) -> tuple[tuple[str, str], ...]:
    """A conversation as (role, content) pairs, checked turn by turn (an assistant turn is required for
    training and scoring; a prompt to answer ends with the user's turn instead)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    messages = []
    for index, turn in enumerate(turns):
        at = f"{where}: messages[{index}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{at} must be an object with 'role' and 'content', got {type(turn).__name__}")
        role = _text(turn, "role", at)
        if role not in ROLES:
            raise ValueError(f"{at}: role {role!r} is invalid: expected one of {', '.join(ROLES)}")
        content = _text(turn, "content", at)
        if role == "assistant" and not content.strip():
            raise ValueError(f"{at}: the assistant turn is empty")
        messages.append((role, content))
    if need_assistant and not any(role == "assistant" for role, _ in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn (nothing to learn or to score)")
    return tuple(messages)


def _choices(record: dict[str, Any], answer: str, where: str) -> tuple[str, ...]:
    choices = record.get("choices")
    if choices is None:
        return ()
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(
            f"{where}: field 'choices' must be a list of at least two strings, got {choices!r:.80}"
        )
    if answer not in choices:
        raise ValueError(f"{where}: field 'answer' {answer!r:.60} is not one of its choices {choices!r:.80}")
    return tuple(choices)


def record_task(record: dict[str, Any], default: str, where: str) -> str:
    """The record's `task` field, or the default (the --data name or the file's stem)."""
    task = record.get("task")
    if task is None:
        return default
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"{where}: field 'task' must be a non-empty string, got {task!r:.60}")
    return task


def to_example(record: dict[str, Any], fmt: str, template: str, task: str, where: str) -> Example:
    """The Example a record of format `fmt` becomes when trained with `template` ('alpaca', 'none' or
    'chat'; instruction and prompt/completion records become a one-turn conversation under 'chat')."""
    if fmt == "messages":
        if template != "chat":
            raise ValueError(
                f"{where}: a messages record needs --template chat (got {template!r}): a conversation has "
                "no Alpaca or plain form"
            )
        messages = parse_messages(record["messages"], where)
        last_assistant = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
        output = messages[last_assistant][1]
        users = [content for role, content in messages[:last_assistant] if role == "user"]
        instruction, source = (users[-1] if users else ""), ""
    elif fmt == "instruction":
        instruction = _nonempty(record, "instruction", where)
        source = _text(record, "input", where, required=False)
        output = _response(record, "output", where)
        messages = (("user", plain_prompt(instruction, source)), ("assistant", output))
    else:
        instruction, source = _nonempty(record, "prompt", where), ""
        output = _response(record, "completion", where)
        messages = (("user", instruction), ("assistant", output))
    answer = _text(record, "answer", where, required=False) or output
    return Example(
        task,
        instruction,
        source,
        output,
        answer,
        messages=messages if template == "chat" else (),
        choices=_choices(record, answer, where),
    )


def rename_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """A record with its fields renamed to the names comoe reads (columns: comoe's name -> the file's)."""
    renamed = dict(record)
    for ours, theirs in columns.items():
        if theirs in renamed:
            renamed[ours] = renamed.pop(theirs)
    return renamed
