"""Prompt templates by name: the Alpaca prompt, the bare text, and the names the command line offers."""

from comoe.data.templates import TEMPLATE_NAMES, TEMPLATES, format_prompt, plain_prompt
from comoe.settings import TEMPLATE_CHOICES


def test_prompt_with_input_has_the_input_section():
    assert "### Input:\nctx\n\n### Response:\n" in format_prompt("do it", "ctx")
    assert "### Input:" not in format_prompt("do it") and format_prompt("do it").endswith("### Response:\n")


def test_plain_prompt_is_the_text_as_it_is():
    assert plain_prompt("q") == "q" and plain_prompt("q", "ctx") == "q\nctx"
    assert {"alpaca": format_prompt, "none": plain_prompt} == TEMPLATES


def test_the_command_line_offers_exactly_the_templates():
    """settings.py is pure Python and keeps its own copy of the names (--help loads no data layer)."""
    assert TEMPLATE_CHOICES[0] == "auto"
    assert sorted(TEMPLATE_CHOICES[1:]) == sorted(TEMPLATE_NAMES) == ["alpaca", "chat", "none"]
