"""The record-format registry: each format is one object (fields, default template, conversion), detection
and the command line's --format choices come from it, and a new format is one class and one entry."""

from typing import Any

import pytest

from comoe.data.formats import (
    RECORD_FORMATS,
    Content,
    RecordFormat,
    nonempty_field,
    record_format,
    register_format,
)
from comoe.data.sources import load_data
from tests.helpers import CONVERSATION, write_jsonl

BUILT_IN = {"instruction", "prompt_completion", "messages"}


def test_the_built_in_formats_and_their_templates():
    assert set(RECORD_FORMATS) == BUILT_IN
    assert {name: fmt.default_template for name, fmt in RECORD_FORMATS.items()} == {
        "instruction": "alpaca",
        "prompt_completion": "none",
        "messages": "chat",
    }


def test_a_record_is_detected_by_the_fields_it_fills():
    assert record_format({"instruction": "q", "input": None, "output": "o"}, "r").name == "instruction"
    assert record_format({"prompt": "p", "completion": "c", "task": "t"}, "r").name == "prompt_completion"
    assert record_format(CONVERSATION, "r").name == "messages"
    assert record_format({"prompt": "p", "answer": "a"}, "r").name == "prompt_completion"  # an eval item
    with pytest.raises(ValueError, match=r"r: fields of several formats \(fields: messages, prompt\)"):
        record_format({"prompt": "p", "messages": []}, "r")
    with pytest.raises(
        ValueError, match=r"r: the record lacks field\(s\) \['completion'\] of the prompt_com"
    ):
        record_format({"prompt": "p"}, "r")
    with pytest.raises(ValueError, match="r: expected an object with fields, got list"):
        record_format(["p"], "r")


def test_each_format_becomes_an_example_in_its_template():
    instruction = RECORD_FORMATS["instruction"].to_example(
        {"instruction": "Add.", "input": "2 3", "output": "5"}, "alpaca", "add", "r"
    )
    assert (instruction.instruction, instruction.input, instruction.output, instruction.answer) == (
        "Add.",
        "2 3",
        "5",
        "5",
    )
    assert instruction.template == "alpaca" and instruction.messages == ()
    chat = RECORD_FORMATS["instruction"].to_example(
        {"instruction": "Add.", "output": "5"}, "chat", "add", "r"
    )
    assert chat.messages == (("user", "Add."), ("assistant", "5")) and chat.template == "chat"
    item = RECORD_FORMATS["prompt_completion"].to_example(
        {"prompt": "Pick.", "answer": "b", "choices": ["a", "b"]}, "none", "pick", "r"
    )
    assert (item.output, item.answer, item.choices, item.template) == ("b", "b", ("a", "b"), "none")
    turns = RECORD_FORMATS["messages"].to_example(CONVERSATION, "chat", "talk", "r")
    assert (turns.instruction, turns.output, len(turns.messages)) == ("2+2?", "4", 5)
    with pytest.raises(ValueError, match="r: a messages record needs --template chat \\(got 'alpaca'\\)"):
        RECORD_FORMATS["messages"].to_example(CONVERSATION, "alpaca", "talk", "r")
    assert not RECORD_FORMATS["messages"].accepts("none") and RECORD_FORMATS["instruction"].accepts("none")


class QuestionAnswer(RecordFormat):
    """{question, answer}: the whole of a new format (its registration is in the test)."""

    def content(self, record: dict[str, Any], template: str, where: str) -> Content:
        question = nonempty_field(record, "question", where)
        answer = nonempty_field(record, "answer", where)
        return Content(question, "", answer, (("user", question), ("assistant", answer)))


def test_a_new_format_is_one_class_and_one_registry_entry(tmp_path):
    path = write_jsonl(
        tmp_path / "quiz.jsonl", [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}]
    )
    register_format(QuestionAnswer("qa", ("question", "answer"), "none", response="answer"))
    try:
        examples = load_data([str(path)])
        assert [(e.task, e.instruction, e.output, e.answer) for e in examples] == [
            ("quiz", "2+2?", "4", "4"),
            ("quiz", "3+3?", "6", "6"),
        ]
        assert {(e.template, e.scoring) for e in examples} == {("none", "number")}
        chat = load_data([str(path)], template="chat")[0]
        assert chat.messages == (("user", "2+2?"), ("assistant", "4"))
        # `answer` is shared by every format: only `question` identifies the new one
        assert record_format({"instruction": "q", "output": "o", "answer": "a"}, "r").name == "instruction"
        with pytest.raises(ValueError, match=r"lacks field\(s\) \['answer'\] of the qa format"):
            record_format({"question": "q"}, "r")
    finally:
        RECORD_FORMATS.pop("qa")
    assert set(RECORD_FORMATS) == BUILT_IN
    with pytest.raises(ValueError, match="record 0: no known format"):
        load_data([str(path)])


def test_a_default_template_must_be_a_template():
    with pytest.raises(ValueError, match="format 'qa' default_template='jinja' is invalid"):
        QuestionAnswer("qa", ("question", "answer"), "jinja")
