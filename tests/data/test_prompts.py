"""Prompt rendering reads the template an example carries: no registry, the same example always renders
the same way."""

import pytest

from comoe.data import TASKS, Example
from comoe.data.prompts import render_prompt, training_segments
from comoe.data.templates import format_prompt

CHAT = (("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"))


def test_each_template_renders_the_prompt_it_names():
    alpaca = Example("boolq", "Is it?", "ctx", "true", "true")
    assert render_prompt(alpaca) == format_prompt("Is it?", "ctx")
    assert render_prompt(alpaca).endswith("### Input:\nctx\n\n### Response:\n")
    assert render_prompt(Example("boolq", "2+2?", "", "4", "4", template="none")) == "2+2?"
    assert render_prompt(Example("mine", "2+2?", "a note", "4", "4", template="none")) == "2+2?\na note"
    assert "mine" not in TASKS  # nothing was registered to render it


def test_the_chat_template_needs_the_tokenizer(smol_tokenizer):
    example = Example("mine", "2+2?", "", "4", "4", messages=CHAT, template="chat")
    with pytest.raises(
        ValueError, match="task 'mine' uses the chat template: its prompts need the tokenizer"
    ):
        render_prompt(example)
    assert render_prompt(example, smol_tokenizer) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_training_segments_learn_the_output_or_every_assistant_turn(smol_tokenizer):
    text = Example("mine", "Say hi.", "", "hi", "hi", template="none")
    assert training_segments(text, smol_tokenizer) == ([("Say hi.", False), ("hi", True)], True)
    chat = Example("mine", "2+2?", "", "4", "4", messages=CHAT, template="chat")
    segments, eos = training_segments(chat, smol_tokenizer)
    assert not eos and [text for text, learned in segments if learned] == ["4<|im_end|>\n"]
