"""Tokenisation with response-only labels, checked against token ids built by hand with the real tokenizer:
the Alpaca prompt, plain prompt/completion with an exact boundary, BOS once, truncation and padding."""

from comoe.data import builtin_examples
from comoe.data.collate import IGNORE_INDEX, pad_batch, tokenize_example
from comoe.data.templates import format_prompt
from tests.helpers import CONVERSATION, encode_records, learned_ids, token_ids


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


def test_instruction_record_is_the_alpaca_prompt_then_the_output(smol_tokenizer):
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    _, (item,) = encode_records(smol_tokenizer, [record])
    prompt = token_ids(smol_tokenizer, format_prompt("Add the numbers.", "2 and 3"))
    response = token_ids(smol_tokenizer, "5") + [smol_tokenizer.eos_token_id]
    assert item.input_ids == prompt + response
    assert item.labels == [IGNORE_INDEX] * len(prompt) + response


def test_prompt_completion_is_plain_concatenation_with_an_exact_boundary(smol_tokenizer):
    # "hel" + "lo" would be one token tokenised together: each side is tokenised alone, as at inference.
    hello = token_ids(smol_tokenizer, "Say hello")
    assert hello != token_ids(smol_tokenizer, "Say hel") + token_ids(smol_tokenizer, "lo")
    _, (item,) = encode_records(smol_tokenizer, [{"prompt": "Say hel", "completion": "lo"}])
    prompt = token_ids(smol_tokenizer, "Say hel")
    response = token_ids(smol_tokenizer, "lo") + [smol_tokenizer.eos_token_id]
    assert item.input_ids == prompt + response
    assert learned_ids(item) == response


def test_a_tokenizer_that_adds_bos_gets_it_once(smol_tokenizer):
    """Gemma- and Llama-style tokenizers add BOS by default: every sequence starts with it, also where
    prompts are tokenised without special tokens, and a chat template that spells it is not doubled."""
    tokenizer = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path, add_bos_token=True)
    bos = tokenizer.bos_token_id
    assert tokenizer("a")["input_ids"][0] == bos  # the precondition: this tokenizer adds BOS
    _, (item,) = encode_records(tokenizer, [{"instruction": "Hi", "output": "Yo"}])
    assert item.input_ids[0] == bos and item.input_ids[1] != bos
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    _, (chat,) = encode_records(tokenizer, [CONVERSATION])
    assert chat.input_ids[0] == bos and chat.input_ids[1] != bos
    assert smol_tokenizer("a")["input_ids"][0] != smol_tokenizer.bos_token_id  # SmolLM2: unchanged, no BOS
