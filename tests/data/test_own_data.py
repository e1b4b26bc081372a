"""Your own data (--data): each format becomes the token ids and labels a hand-built reference gives,
columns are renamed, datasets folders and every file type read, validation splits are seeded and disjoint,
and each kind of bad input is one line naming the file, record and field."""

import json

import datasets
import pytest

from comoe.data.collate import IGNORE_INDEX, encode_examples
from comoe.data.sources import DataSpec, examples_from_records, load_data, read_records, register_tasks
from comoe.data.tasks import get_task
from comoe.data.templates import format_prompt
from comoe.evaluation.respond import prompt_example, read_prompts
from comoe.evaluation.settings import GenerateArgs
from comoe.training.data import split_validation
from tests.helpers import one_line_error

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def encode(tokenizer, records, **options):
    examples, templates = examples_from_records(records, "test", "mytask", **options)
    register_tasks(examples, templates)
    items, _ = encode_examples(tokenizer, examples, cutoff=512)
    return examples, items


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def learned(item):
    return [token for token in item.labels if token != IGNORE_INDEX]


def test_instruction_record_is_the_alpaca_prompt_then_the_output(smol_tokenizer):
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    _, (item,) = encode(smol_tokenizer, [record])
    prompt = ids(smol_tokenizer, format_prompt("Add the numbers.", "2 and 3"))
    response = ids(smol_tokenizer, "5") + [smol_tokenizer.eos_token_id]
    assert item.input_ids == prompt + response
    assert item.labels == [IGNORE_INDEX] * len(prompt) + response


def test_prompt_completion_is_plain_concatenation_with_an_exact_boundary(smol_tokenizer):
    # "hel" + "lo" would be one token tokenised together: each side is tokenised alone, as at inference.
    assert ids(smol_tokenizer, "Say hello") != ids(smol_tokenizer, "Say hel") + ids(smol_tokenizer, "lo")
    _, (item,) = encode(smol_tokenizer, [{"prompt": "Say hel", "completion": "lo"}])
    prompt, response = (
        ids(smol_tokenizer, "Say hel"),
        ids(smol_tokenizer, "lo") + [smol_tokenizer.eos_token_id],
    )
    assert item.input_ids == prompt + response
    assert learned(item) == response


def test_conversation_learns_every_assistant_turn_and_keeps_the_system_prompt(smol_tokenizer):
    (example,), (item,) = encode(smol_tokenizer, [CONVERSATION])
    assert get_task("mytask").template == "chat" and example.output == "4"
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
    expected_ids = [t for text, _ in spans for t in ids(smol_tokenizer, text)]
    expected_labels = [
        t if learn else IGNORE_INDEX for text, learn in spans for t in ids(smol_tokenizer, text)
    ]
    assert item.input_ids == expected_ids
    assert item.labels == expected_labels
    assert smol_tokenizer.decode(learned(item)) == "Hello!<|im_end|>\n4<|im_end|>\n"


def test_chat_boundary_is_exact_where_the_template_merges_tokens(smol_tokenizer):
    """A template with no separator between the turns: 'Say hel' + 'lo' tokenises differently together."""
    tokenizer = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
        "{% else %}{{ m['content'] }}.{% endif %}{% endfor %}"
    )
    record = {"messages": [{"role": "user", "content": "Say hel"}, {"role": "assistant", "content": "lo"}]}
    assert ids(tokenizer, "Say hello.") != ids(tokenizer, "Say hel") + ids(tokenizer, "lo.")
    _, (item,) = encode(tokenizer, [record])
    assert item.input_ids == ids(tokenizer, "Say hel") + ids(tokenizer, "lo.")
    assert tokenizer.decode(learned(item)) == "lo."


def test_instruction_records_under_the_chat_template(smol_tokenizer):
    (example,), (item,) = encode(smol_tokenizer, [{"instruction": "Hi", "output": "Yo"}], template="chat")
    assert example.messages == (("user", "Hi"), ("assistant", "Yo"))
    assert smol_tokenizer.decode(learned(item)) == "Yo<|im_end|>\n"


def test_a_tokenizer_without_a_chat_template_is_refused(smol_tokenizer):
    tokenizer = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; use --template alpaca or none"):
        encode(tokenizer, [CONVERSATION])


def test_columns_are_renamed_and_task_fields_and_names_decide_the_task(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": "q1", "response": "r1", "task": "alpha"}, {"question": "q2", "response": "r2"}],
    )
    examples = load_data([str(path)], columns={"instruction": "question", "output": "response"})
    assert [(e.task, e.instruction, e.output) for e in examples] == [
        ("alpha", "q1", "r1"),
        ("qa", "q2", "r2"),
    ]
    named = load_data([f"mine={path}"], columns={"instruction": "question", "output": "response"})
    assert {e.task for e in named} == {"mine"}
    assert DataSpec.parse("a=b=c.jsonl") == DataSpec(path=type(path)("b=c.jsonl"), name="a")
    assert DataSpec.parse("/x/a=b.jsonl").name is None


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "csv", "dataset", "datasetdict"])
def test_every_file_type_reads_the_same_records(tmp_path, kind):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "parquet":
        table.to_parquet(str(path))
    elif kind == "csv":
        table.to_csv(str(path), index=False)
    elif kind == "dataset":
        table.save_to_disk(str(path))
    else:
        datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(path))
        assert read_records(path, "test") == rows[:1]
    assert read_records(path) == rows


def test_validation_split_is_seeded_disjoint_and_covers_every_task():
    records = [{"prompt": f"p{i}", "completion": "c", "task": "ab"[i % 2]} for i in range(40)]
    examples, _ = examples_from_records(records, "test", "t")
    train, validation = split_validation(examples, 0.25, seed=3)
    again, _ = split_validation(examples, 0.25, seed=3)
    other, _ = split_validation(examples, 0.25, seed=4)
    assert len(validation) == 10 and {e.task for e in validation} == {"a", "b"}
    assert not {e.instruction for e in train} & {e.instruction for e in validation}
    assert sorted(e.instruction for e in train + validation) == sorted(e.instruction for e in examples)
    assert again == train and other != train


def test_scoring_is_chosen_from_the_answers():
    items = [
        ({"prompt": "p", "answer": "yes", "choices": ["yes", "no"]}, "choice"),
        (
            {"instruction": "Sky blue?\n\nAnswer format: true/false", "answer": "true"},
            "choice",
        ),  # LLM-Adapters
        ({"prompt": "p", "completion": "12.5"}, "number"),
        ({"prompt": "p", "completion": "a cat"}, "exact"),
    ]
    for record, scoring in items:
        examples, templates = examples_from_records([record], "test", f"task-{scoring}")
        register_tasks(examples, templates)
        assert get_task(f"task-{scoring}").scoring == scoring


BAD_INPUTS = [
    ("missing.jsonl", None, "no such file or folder"),
    ("data.txt", "hello\n", "unknown file type '.txt'"),
    ("data.jsonl", '{"text": "x"}\n', "record 0: no known format (fields: text)"),
    ("data.jsonl", '{"prompt": "x", "completion": "  "}\n', "record 0: field 'completion' is empty"),
    (
        "data.jsonl",
        '{"prompt": "x", "completion": "y"}\n{"instruction": "x", "output": "y"}\n',
        "record 1 is a instruction record but record 0 says prompt_completion",
    ),
    (
        "data.jsonl",
        '{"messages": [{"role": "user", "content": "hi"}]}\n',
        "record 0: the conversation has no assistant turn",
    ),
    ("data.jsonl", '{"prompt": "x", "completion": "\xff"}\n', "line 1 is not valid UTF-8"),
    (
        "data.jsonl",
        '{"prompt": "x", "completion": 5}\n',
        "record 0: field 'completion' must be a string, got int",
    ),
    (
        "data.jsonl",
        '{"messages": [{"role": "robot", "content": "hi"}]}\n',
        "record 0: messages[0]: role 'robot' is invalid",
    ),
    (
        "data.jsonl",
        '{"prompt": "x", "answer": "z", "choices": ["a", "b"]}\n',
        "'z' is not one of its choices",
    ),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_INPUTS)
def test_bad_input_is_one_line_naming_file_record_and_field(capsys, tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content.encode("latin-1") if "\xff" in content else content.encode())
    message = one_line_error(capsys, ["train", "--data", str(path), "--output", str(tmp_path / "run")])
    assert expected in message and str(path) in message
    assert not (tmp_path / "run").exists()  # refused before the model loads or the run folder is made


def test_a_tokenizer_that_adds_bos_gets_it_once(smol_tokenizer):
    """Gemma- and Llama-style tokenizers add BOS by default: every sequence starts with it, also where
    prompts are tokenised without special tokens, and a chat template that spells it is not doubled."""
    tokenizer = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path, add_bos_token=True)
    bos = tokenizer.bos_token_id
    assert tokenizer("a")["input_ids"][0] == bos  # the precondition: this tokenizer adds BOS
    _, (item,) = encode(tokenizer, [{"instruction": "Hi", "output": "Yo"}])
    assert item.input_ids[0] == bos and item.input_ids[1] != bos
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    _, (chat,) = encode(tokenizer, [CONVERSATION])
    assert chat.input_ids[0] == bos and chat.input_ids[1] != bos
    assert smol_tokenizer("a")["input_ids"][0] != smol_tokenizer.bos_token_id  # SmolLM2: unchanged, no BOS


def test_generate_reads_prompt_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first question\n\n  second question  \n")
    assert read_prompts(GenerateArgs(prompts=str(text))) == ["first question", "  second question  "]
    rows = tmp_path / "prompts.jsonl"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rows.write_text(json.dumps({"prompt": "p"}) + "\n" + json.dumps({"messages": conversation}) + "\n")
    prompts = read_prompts(GenerateArgs(prompts=str(rows)))
    assert prompts == ["p", (("system", "Be brief."), ("user", "Hi"))]
    assert prompt_example(prompts[1], "chat").messages == prompts[1]
    with pytest.raises(ValueError, match="a messages prompt needs --template chat"):
        prompt_example(prompts[1], "alpaca")
    rows.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="line 1: expected an object with 'prompt'"):
        read_prompts(GenerateArgs(prompts=str(rows)))
    with pytest.raises(ValueError, match="exactly one of --prompt TEXT or --prompts FILE"):
        GenerateArgs()
