"""Conversations through the tokenizer's own chat template: every assistant turn learned, everything else
context, compared against SmolLM2's ChatML template spelled out by hand."""

import pytest

from comoe.data.collate import IGNORE_INDEX
from tests.helpers import CONVERSATION, encode_records, learned_ids, token_ids


def test_conversation_learns_every_assistant_turn_and_keeps_the_system_prompt(smol_tokenizer):
    (example,), (item,) = encode_records(smol_tokenizer, [CONVERSATION])
    assert example.template == "chat" and example.output == "4"
    # SmolLM2's ChatML template, spelled out by hand: context spans unlabelled, assistant spans learned.
    spans = [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
            0,
        ),
        ("Hello!<|im_end|>\n", 1),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("4<|im_end|>\n", 1),
    ]
    expected_ids = [t for text, _ in spans for t in token_ids(smol_tokenizer, text)]
    expected_labels = [
        t if learn else IGNORE_INDEX for text, learn in spans for t in token_ids(smol_tokenizer, text)
    ]
    assert item.input_ids == expected_ids
    assert item.labels == expected_labels
    assert smol_tokenizer.decode(learned_ids(item)) == "Hello!<|im_end|>\n4<|im_end|>\n"


def test_chat_boundary_is_exact_where_the_template_merges_tokens(smol_tokenizer):
    """A template with no separator between the turns: 'Say hel' + 'lo' tokenises differently together."""
    tokenizer = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
        "{% else %}{{ m['content'] }}.{% endif %}{% endfor %}"
    )
    record = {"messages": [{"role": "user", "content": "Say hel"}, {"role": "assistant", "content": "lo"}]}
    assert token_ids(tokenizer, "Say hello.") != token_ids(tokenizer, "Say hel") + token_ids(tokenizer, "lo.")
    _, (item,) = encode_records(tokenizer, [record])
    assert item.input_ids == token_ids(tokenizer, "Say hel") + token_ids(tokenizer, "lo.")
    assert tokenizer.decode(learned_ids(item)) == "lo."


def test_instruction_records_under_the_chat_template(smol_tokenizer):
    (example,), (item,) = encode_records(
        smol_tokenizer, [{"instruction": "Hi", "output": "Yo"}], template="chat"
    )
    assert example.messages == (("user", "Hi"), ("assistant", "Yo"))
    assert smol_tokenizer.decode(learned_ids(item)) == "Yo<|im_end|>\n"


def test_a_tokenizer_without_a_chat_template_is_refused(smol_tokenizer):
    tokenizer = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; use --template alpaca or none"):
        encode_records(tokenizer, [CONVERSATION])
