"""Record formats of user data: the registry of formats, which one a record is in, and the Example it
becomes under a template.

A format is one `RecordFormat` object in `RECORD_FORMATS`: its name, the fields that identify it, its
response field, the template it trains with by default, and how a record becomes an Example. Three are
built in, as PEFT/TRL, MoE-PEFT and torchtune users keep their data:
- instruction: {instruction, input?, output, answer?} (Alpaca / LLM-Adapters);
- prompt_completion: {prompt, completion} (TRL's prompt-completion datasets);
- messages: {messages: [{role, content}, ...]} (conversations; roles system, user, assistant).
Any record may also carry the SHARED_FIELDS: `task` (what per-task metrics and routing analysis group by),
`answer` (the gold answer evaluation compares against; default: the response) and `choices` (a
multiple-choice item's options, `answer` being one of them). Every check names the record and the field,
since a user fixes a file by its line, not by a Python traceback.

Adding a format is one subclass of RecordFormat (its `content`) and one `register_format` call, here or in
a plugin module of your own (comoe.plugins); `--format NAME` takes any registered name.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

from comoe.data.chat import ROLES
from comoe.data.example import Example
from comoe.data.templates import TEMPLATE_NAMES, plain_prompt
from comoe.plugins import discover_once
from comoe.validation import check_choice

SHARED_FIELDS = ("task", "answer", "choices")  # optional in every format, so they identify none

Messages = tuple[tuple[str, str], ...]


class Content(NamedTuple):
    """What a record says, whatever its format: the instruction and input that text templates render,
    the response, and the conversation the chat template renders."""

    instruction: str
    input: str
    output: str
    messages: Messages


@dataclass(frozen=True)
class RecordFormat(ABC):
    """One record format. `required` fields must all be present (those not in SHARED_FIELDS identify the
    format); `response` is the field that holds the response, which an evaluation record may leave out when
    it gives `answer`; `default_template` renders its records under --template auto. A subclass reads a
    record's `content`; `to_example` adds what every format shares (answer, choices, template)."""

    name: str
    required: tuple[str, ...]
    default_template: str
    response: str | None = None

    def __post_init__(self) -> None:
        check_choice(f"format {self.name!r} default_template", self.default_template, TEMPLATE_NAMES)

    @property
    def identifying(self) -> tuple[str, ...]:
        """The fields whose presence says a record is in this format."""
        return tuple(key for key in self.required if key not in SHARED_FIELDS)

    def accepts(self, template: str) -> bool:
        """Whether records of this format can be rendered with `template` (any, unless a format says)."""
        return template in TEMPLATE_NAMES

    @abstractmethod
    def content(self, record: dict[str, Any], template: str, where: str) -> Content:
        """The record's instruction, input, response and conversation (checked field by field)."""

    def to_example(self, record: dict[str, Any], template: str, task: str, where: str) -> Example:
        """The Example a record becomes when trained with `template` ('alpaca', 'none' or 'chat'; under
        'chat' it keeps the conversation, a one-turn one for formats without turns)."""
        content = self.content(record, template, where)
        given = record.get("answer") is not None  # given, it must say something: it is what is scored
        answer = nonempty_field(record, "answer", where) if given else content.output
        return Example(
            task,
            content.instruction,
            content.input,
            content.output,
            answer,
            messages=content.messages if template == "chat" else (),
            choices=_choices(record, answer, where),
            template=template,
        )


class InstructionFormat(RecordFormat):
    """{instruction, input?, output}: Alpaca / LLM-Adapters records (the chat template's user turn is the
    instruction with its input)."""

    def content(self, record: dict[str, Any], template: str, where: str) -> Content:
        instruction = nonempty_field(record, "instruction", where)
        source = text_field(record, "input", where, required=False)
        output = response_field(record, "output", where)
        return Content(
            instruction, source, output, (("user", plain_prompt(instruction, source)), ("assistant", output))
        )


class PromptCompletionFormat(RecordFormat):
    """{prompt, completion}: TRL's prompt-completion records."""

    def content(self, record: dict[str, Any], template: str, where: str) -> Content:
        prompt = nonempty_field(record, "prompt", where)
        output = response_field(record, "completion", where)
        return Content(prompt, "", output, (("user", prompt), ("assistant", output)))


class MessagesFormat(RecordFormat):
    """{messages: [{role, content}, ...]}: a conversation, whose last assistant turn is the response and
    last user turn before it the instruction. Only the chat template renders it."""

    def accepts(self, template: str) -> bool:
        return template == "chat"

    def content(self, record: dict[str, Any], template: str, where: str) -> Content:
        if not self.accepts(template):
            raise ValueError(
                f"{where}: a messages record needs --template chat (got {template!r}): a conversation has "
                "no Alpaca or plain form"
            )
        messages = parse_messages(record["messages"], where)
        last_assistant = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
        users = [content for role, content in messages[:last_assistant] if role == "user"]
        return Content(users[-1] if users else "", "", messages[last_assistant][1], messages)


RECORD_FORMATS: dict[str, RecordFormat] = {}


def register_format(fmt: RecordFormat) -> RecordFormat:
    """Add (or replace) a record format; returns it. Detection tries formats in registration order."""
    RECORD_FORMATS[fmt.name] = fmt
    return fmt


# The default templates: Alpaca for instruction records (the papers' format), plain concatenation for
# prompt/completion, the chat template for conversations.
register_format(InstructionFormat("instruction", ("instruction", "output"), "alpaca", response="output"))
register_format(PromptCompletionFormat("prompt_completion", ("prompt", "completion"), "none", "completion"))
register_format(MessagesFormat("messages", ("messages",), "chat"))


_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")


def answer_format_options(instruction: str) -> list[str] | None:
    """The option words of an LLM-Adapters commonsense instruction ('... Answer format: a/b/c'), or None."""
    match = _ANSWER_FORMAT.search(instruction.strip())
    return match.group(1).split("/") if match else None


def record_format(record: Any, where: str) -> RecordFormat:
    """The format of one record, from the fields it fills (a field that is null counts as absent)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with fields, got {type(record).__name__}")
    present = {key for key, value in record.items() if value is not None}
    found = [fmt for fmt in RECORD_FORMATS.values() if any(key in present for key in fmt.identifying)]
    if not found and discover_once():  # a plugin's format, registered on first need
        found = [fmt for fmt in RECORD_FORMATS.values() if any(key in present for key in fmt.identifying)]
    if len(found) != 1:
        expected = "; ".join(f"{fmt.name}: {', '.join(fmt.required)}" for fmt in RECORD_FORMATS.values())
        has = ", ".join(sorted(present)) or "none"
        reason = "fields of several formats" if found else "no known format"
        raise ValueError(f"{where}: {reason} (fields: {has}); expected one of {expected}")
    fmt = found[0]
    # An evaluation item may give only its answer (with choices, or scored by match): it is the response.
    missing = [
        key
        for key in fmt.required
        if key not in present and not (key == fmt.response and "answer" in present)
    ]
    if missing:
        raise ValueError(f"{where}: the record lacks field(s) {missing} of the {fmt.name} format")
    return fmt


def text_field(record: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    """A string field of a record ('' when absent and not required)."""
    value = record.get(key)
    if value is None:
        if required:
            raise ValueError(f"{where}: field {key!r} is missing")
        return ""
    if not isinstance(value, str):  # never train on "None", "{'x': 1}" or "nan"
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def nonempty_field(record: dict[str, Any], key: str, where: str) -> str:
    """A string field that must have more than whitespace."""
    value = text_field(record, key, where)
    if not value.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return value


def response_field(record: dict[str, Any], key: str, where: str) -> str:
    """The response field, or the answer for an evaluation item that gives only that."""
    if record.get(key) is None and record.get("answer") is not None:
        return nonempty_field(record, "answer", where)
    return nonempty_field(record, key, where)


def parse_messages(turns: Any, where: str, need_assistant: bool = True) -> Messages:
    """A conversation as (role, content) pairs, checked turn by turn (an assistant turn is required for
    training and scoring; a prompt to answer ends with the user's turn instead)."""
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    messages = []
    for index, turn in enumerate(turns):
        at = f"{where}: messages[{index}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{at} must be an object with 'role' and 'content', got {type(turn).__name__}")
        role = text_field(turn, "role", at)
        if role not in ROLES:
            raise ValueError(f"{at}: role {role!r} is invalid: expected one of {', '.join(ROLES)}")
        content = text_field(turn, "content", at)
        if role != "system" and not content.strip():  # an empty system turn may mean "no system prompt"
            raise ValueError(f"{at}: the {role} turn is empty")
        messages.append((role, content))
    if need_assistant and not any(role == "assistant" for role, _ in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn (nothing to learn or to score)")
    return tuple(messages)


def _choices(record: dict[str, Any], answer: str, where: str) -> tuple[str, ...]:
    choices = record.get("choices")
    if choices is None:
        return ()
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise ValueError(
            f"{where}: field 'choices' must be a list of at least two non-empty strings, got {choices!r:.80}"
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


def rename_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """A record with its fields renamed to the names comoe reads (columns: comoe's name -> the file's)."""
    renamed = dict(record)
    for ours, theirs in columns.items():
        if theirs in renamed:
            renamed[ours] = renamed.pop(theirs)
    return renamed
