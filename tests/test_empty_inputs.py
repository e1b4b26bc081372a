"""Empty inputs at the command line (failure kind 4 of the reliability review): every command given an empty
prompt, file, record, field, flag value or config file answers with one line naming it and what is expected,
exit 2, before any model is loaded (the model named here does not exist: had it been loaded first, the error
would be about it) and without leaving a run folder behind."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from tests.helpers import one_line_error, write_jsonl

NO_MODEL = "/nonexistent/model"  # never reached: each error comes first
HINT = " (run with --debug for the traceback)"
EMPTY_CONFIG = "no settings in the file (it is empty or only comments); expected a mapping of settings, e.g. 'lr: 0.0002'"
PAIR = {"prompt": "2+2?", "completion": "4"}


@pytest.fixture
def inputs(tmp_path) -> Path:
    """One file per empty input, in tmp_path."""
    for name, text in {
        "empty.jsonl": "",
        "blank.jsonl": "\n  \n",
        "empty.json": "",
        "list.json": "[]",
        "empty.csv": "",
        "header.csv": "prompt,completion\n",
        "empty.yaml": "",
        "comments.yaml": "# lr: 0.001\n",
        "blank.txt": "  \n\n",
        "fieldless.jsonl": "{}\n",
    }.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "empty.parquet").write_bytes(b"")
    schema = {"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())}
    pq.write_table(pa.table(schema), tmp_path / "rows0.parquet")
    DatasetDict({"train": Dataset.from_dict({"prompt": [], "completion": []})}).save_to_disk(
        tmp_path / "folder"
    )
    write_jsonl(tmp_path / "one-per-task.jsonl", [PAIR, {**PAIR, "task": "other"}])
    write_jsonl(tmp_path / "ok.jsonl", [PAIR, PAIR])
    write_jsonl(tmp_path / "empty-prompt.jsonl", [{"prompt": " ", "completion": "4"}])
    write_jsonl(tmp_path / "empty-completion.jsonl", [{"prompt": "2+2?", "completion": ""}])
    write_jsonl(tmp_path / "empty-instruction.jsonl", [{"instruction": "", "output": "4"}])
    write_jsonl(tmp_path / "empty-answer.jsonl", [{**PAIR, "answer": ""}])
    write_jsonl(tmp_path / "empty-choice.jsonl", [{**PAIR, "answer": "4", "choices": ["", "4"]}])
    user = [{"role": "user", "content": ""}, {"role": "assistant", "content": "4"}]
    write_jsonl(tmp_path / "empty-user.jsonl", [{"messages": user}])
    write_jsonl(tmp_path / "empty-messages.jsonl", [{"messages": []}])
    write_jsonl(tmp_path / "prompts-empty.jsonl", [{"prompt": "  "}])
    ends = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    write_jsonl(tmp_path / "prompts-assistant.jsonl", [{"messages": ends}])
    system = [{"role": "system", "content": "Be brief."}]
    write_jsonl(tmp_path / "prompts-system.jsonl", [{"messages": system}])
    write_jsonl(tmp_path / "prompts-user.jsonl", [{"messages": [{"role": "user", "content": " "}]}])
    return tmp_path


# (command line with {d} for the inputs folder, the message with {d}); `train` runs get --output {d}/run.
CASES = {
    # prompts
    "--prompt ''": (["generate", "--prompt", ""], "--prompt='' is invalid: expected a non-empty string"),
    "--prompt blank": (
        ["generate", "--prompt", " \n"],
        r"--prompt=' \n' is invalid: expected a non-empty string",
    ),
    "--prompts ''": (["generate", "--prompts", ""], "--prompts='' is invalid: expected a non-empty string"),
    "blank .txt prompts": (
        ["generate", "--prompts", "{d}/blank.txt"],
        "--prompts {d}/blank.txt: no prompts (the file is empty or blank); expected one prompt per line",
    ),
    "empty .jsonl prompts": (
        ["generate", "--prompts", "{d}/empty.jsonl"],
        "--prompts {d}/empty.jsonl: no prompts (the file is empty or blank); expected one JSON row per line",
    ),
    "empty prompt field": (
        ["generate", "--prompts", "{d}/prompts-empty.jsonl"],
        "--prompts {d}/prompts-empty.jsonl: line 1: field 'prompt' is empty",
    ),
    "messages prompt ending with the assistant": (
        ["generate", "--prompts", "{d}/prompts-assistant.jsonl", "--template", "chat"],
        "--prompts {d}/prompts-assistant.jsonl: line 1: the conversation ends with an assistant turn; a prompt "
        "ends with the user's turn, which the model answers",
    ),
    "messages prompt of a system turn": (
        ["generate", "--prompts", "{d}/prompts-system.jsonl", "--template", "chat"],
        "--prompts {d}/prompts-system.jsonl: line 1: the conversation ends with a system turn; a prompt ends "
        "with the user's turn, which the model answers",
    ),
    "messages prompt with an empty user turn": (
        ["generate", "--prompts", "{d}/prompts-user.jsonl", "--template", "chat"],
        "--prompts {d}/prompts-user.jsonl: line 1: messages[0]: the user turn is empty",
    ),
    # data files, for every command that reads them
    "empty .jsonl": (
        ["train", "--data", "{d}/empty.jsonl"],
        "--data {d}/empty.jsonl: the file is empty; expected one JSON record per line",
    ),
    "blank .jsonl": (
        ["train", "--data", "{d}/blank.jsonl"],
        "--data {d}/blank.jsonl: the file is empty; expected one JSON record per line",
    ),
    ".jsonl of records without fields": (
        ["train", "--data", "{d}/fieldless.jsonl"],
        "--data {d}/fieldless.jsonl: no records (only records with no fields); expected one JSON record per line",
    ),
    "empty .json": (
        ["train", "--data", "{d}/empty.json"],
        "--data {d}/empty.json: the file is empty; expected a JSON list of records",
    ),
    ".json empty list": (
        ["train", "--data", "{d}/list.json"],
        "--data {d}/list.json: no records (an empty list, or records with no fields); expected a JSON list of "
        "records",
    ),
    "empty .csv": (
        ["train", "--data", "{d}/empty.csv"],
        "--data {d}/empty.csv: the file is empty; expected a header row, then one record per row",
    ),
    ".csv header alone": (
        ["train", "--data", "{d}/header.csv"],
        "--data {d}/header.csv: no records (a header row alone); expected a header row, then one record per row",
    ),
    "empty .parquet": (
        ["train", "--data", "{d}/empty.parquet"],
        "--data {d}/empty.parquet: the file is empty; expected a table of records",
    ),
    ".parquet of no rows": (
        ["train", "--data", "{d}/rows0.parquet"],
        "--data {d}/rows0.parquet: no records; expected a table of records",
    ),
    "datasets folder with an empty split": (
        ["train", "--data", "{d}/folder"],
        "--data {d}/folder: the train split has no records",
    ),
    "eval: empty .jsonl": (
        ["eval", "--data", "{d}/empty.jsonl"],
        "--data {d}/empty.jsonl: the file is empty; expected one JSON record per line",
    ),
    "analyze: empty .jsonl": (
        ["analyze", "--data", "{d}/empty.jsonl", "--adapter", "{d}/none", "--output", "{d}/analysis"],
        "--data {d}/empty.jsonl: the file is empty; expected one JSON record per line",
    ),
    # empty fields of records
    "empty prompt": (
        ["train", "--data", "{d}/empty-prompt.jsonl"],
        "{d}/empty-prompt.jsonl: record 0: field 'prompt' is empty",
    ),
    "empty completion": (
        ["train", "--data", "{d}/empty-completion.jsonl"],
        "{d}/empty-completion.jsonl: record 0: field 'completion' is empty",
    ),
    "empty instruction": (
        ["train", "--data", "{d}/empty-instruction.jsonl"],
        "{d}/empty-instruction.jsonl: record 0: field 'instruction' is empty",
    ),
    "empty answer": (
        ["eval", "--data", "{d}/empty-answer.jsonl"],
        "{d}/empty-answer.jsonl: record 0: field 'answer' is empty",
    ),
    "empty choice": (
        ["eval", "--data", "{d}/empty-choice.jsonl"],
        "{d}/empty-choice.jsonl: record 0: field 'choices' must be a list of at least two non-empty strings, "
        "got ['', '4']",
    ),
    "empty user turn": (
        ["train", "--data", "{d}/empty-user.jsonl"],
        "{d}/empty-user.jsonl: record 0: messages[0]: the user turn is empty",
    ),
    "empty conversation": (
        ["train", "--data", "{d}/empty-messages.jsonl"],
        "{d}/empty-messages.jsonl: record 0: field 'messages' must be a non-empty list of {{role, content}} "
        "objects",
    ),
    # validation data
    "empty --eval-data": (
        ["train", "--data", "{d}/ok.jsonl", "--eval-data", "{d}/empty.jsonl"],
        "--eval-data {d}/empty.jsonl: the file is empty; expected one JSON record per line",
    ),
    "--eval-data of an empty list": (
        ["train", "--data", "{d}/ok.jsonl", "--eval-data", "{d}/list.json"],
        "--eval-data {d}/list.json: no records (an empty list, or records with no fields); expected a JSON "
        "list of records",
    ),
    "--val-fraction holding out nothing": (
        ["train", "--data", "{d}/one-per-task.jsonl", "--val-fraction", "0.5"],
        "val_fraction=0.5 leaves no validation examples: no task has two examples to split (each task keeps one "
        "to train on; 2 example(s) here); add examples or give --eval-data",
    ),
    # flag values
    "train --tasks ,": (
        ["train", "--tasks", ","],
        "--tasks=[] is invalid: expected at least one task name (leave tasks out for every built-in task)",
    ),
    "eval --tasks ''": (
        ["eval", "--tasks", ""],
        "--tasks=[] is invalid: expected at least one task name (leave tasks out for every built-in task)",
    ),
    "--data ''": (["train", "--data", ""], "--data=[''] is invalid: expected a list of non-empty strings"),
    "--model ''": (["eval", "--model", ""], "--model='' is invalid: expected a non-empty string"),
    "--adapter ''": (["eval", "--adapter", " "], "--adapter=' ' is invalid: expected a non-empty string"),
    "--output ''": (["train", "--output", ""], "--output='' is invalid: expected a non-empty string"),
    "--data-dir ''": (["eval", "--data-dir", ""], "--data-dir='' is invalid: expected a non-empty string"),
    # config files
    "empty --config": (["train", "--config", "{d}/empty.yaml"], "--config {d}/empty.yaml: " + EMPTY_CONFIG),
    "--config of comments": (
        ["eval", "--config", "{d}/comments.yaml"],
        "--config {d}/comments.yaml: " + EMPTY_CONFIG,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_empty_input_is_one_line_naming_it(capsys, inputs, case):
    argv, message = CASES[case]
    argv = [part.format(d=inputs) for part in argv]
    if "--model" not in argv:
        argv += ["--model", NO_MODEL]
    if argv[0] == "train" and "--output" not in argv:
        argv += ["--output", str(inputs / "run")]
    assert one_line_error(capsys, argv) == f"comoe: error: {message.format(d=inputs)}{HINT}"
    assert not (inputs / "run").exists()  # a failed start leaves no run folder


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "'' names no column: expected name=value pairs, e.g. instruction=question,output=response"),
        (",", "',' names no column: expected name=value pairs, e.g. instruction=question,output=response"),
        ("instruction=", "'instruction=' is not name=value (e.g. instruction=question)"),
        ("=question", "'=question' is not name=value (e.g. instruction=question)"),
    ],
)
def test_an_empty_columns_value_is_one_line_naming_the_flag(capsys, inputs, value, message):
    argv = ["train", "--data", str(inputs / "ok.jsonl"), "--columns", value, "--output", str(inputs / "run")]
    expected = f"comoe: error: argument --columns: {message} (see comoe train --help)"
    assert one_line_error(capsys, argv) == expected
    err = capsys.readouterr().err
    assert not err and not (inputs / "run").exists()  # no usage block


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "tasks: []\n",
            "tasks=[] is invalid: expected at least one task name (leave tasks out for every built-in task)",
        ),
        (
            "eval_data: []\n",
            "eval_data=[] is invalid: expected at least one [name=]path (leave eval_data out for no validation)",
        ),
        ("model: ' '\n", "model=' ' is invalid: expected a non-empty string"),
        (
            "columns: {instruction: ''}\n",
            "columns={'instruction': ''} is invalid: expected a mapping of non-empty strings to non-empty strings",
        ),
        ("data: ['']\n", "data=[''] is invalid: expected a list of non-empty strings or null"),
    ],
)
def test_empty_values_in_a_config_file_are_named_with_the_file(capsys, tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    argv = ["train", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run")]
    argv += [] if text.startswith("model") else ["--model", NO_MODEL]
    assert one_line_error(capsys, argv) == f"comoe: error: {tmp_path / 'c.yaml'}: {message}{HINT}"


def test_other_flag_errors_are_one_line_too(capsys):
    message = one_line_error(capsys, ["eval", "--mode", "sample"])
    assert message.startswith("comoe: error: argument --mode: invalid choice: 'sample' (choose from ")
    assert message.endswith("generate') (see comoe eval --help)") or message.endswith(
        "generate) (see comoe eval --help)"
    )


def test_an_empty_validation_split_of_a_dataset_is_named(tmp_path, tiny_model_dir):
    from comoe.training.loop import train
    from tests.helpers import train_args

    splits = DatasetDict(
        {"train": Dataset.from_list([PAIR] * 2), "validation": Dataset.from_list([PAIR]).select([])}
    )
    with pytest.raises(ValueError, match=r"^dataset\['validation'\]: no records$"):
        train(train_args(tiny_model_dir, tmp_path / "run"), dataset=splits)
    assert not (tmp_path / "run").exists()
