"""The Alpaca prompt and response-only labels, checked on a real example and the real tokenizer."""

from comoe.data import builtin_examples
from comoe.data.collate import IGNORE_INDEX, pad_batch, tokenize_example
from comoe.data.templates import format_prompt


def test_labels_cover_exactly_the_response_and_eos(smol_tokenizer):
    example = builtin_examples("train", 1, tasks=["family_relationships"])[0]
    prompt = format_prompt(example.instruction, example.input)
    assert prompt.endswith("### Response:\n") and example.instruction in prompt
    item = tokenize_example(smol_tokenizer, prompt, example.output, cutoff=512)
    labelled = [t for t in item.labels if t != IGNORE_INDEX]
    first = item.labels.index(labelled[0])
    assert all(label == IGNORE_INDEX for label in item.labels[:first])
    assert item.input_ids[first:] == labelled
    assert smol_tokenizer.decode(item.input_ids[:first]) == prompt
    assert smol_tokenizer.decode(labelled) == example.output + smol_tokenizer.eos_token
    assert not item.truncated


def test_truncation_is_flagged_and_padding_is_ignored(smol_tokenizer):
    short = tokenize_example(smol_tokenizer, format_prompt("Say hi."), "hi", cutoff=512)
    long = tokenize_example(smol_tokenizer, format_prompt("Repeat. " * 50), "ok", cutoff=20)
    assert long.truncated and len(long.input_ids) == 20
    batch = pad_batch([short, long], smol_tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert batch["attention_mask"][0].sum() == n and (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_prompt_with_input_has_the_input_section():
    assert "### Input:\nctx\n\n### Response:\n" in format_prompt("do it", "ctx")
