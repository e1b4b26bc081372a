"""Training on your own data end to end (tiny model, SmolLM2's tokenizer and chat template): validation loss
logged every --eval-steps, --save-best keeping the lowest, the adapter recording its template, and
`comoe generate` / `comoe eval --data` prompting as training did."""

import json

import datasets
import torch
from safetensors.torch import load_file

from comoe.adapter.auto import load_adapter
from comoe.cli import main
from comoe.data.collate import encode_examples
from comoe.data.record import DATA_RECORD
from comoe.data.sources import examples_from_records
from comoe.evaluation.runner import eval_examples
from comoe.evaluation.settings import EvalArgs
from comoe.models import load_base
from comoe.training.data import split_validation
from comoe.training.loop import train
from comoe.training.validation import validation_loss
from tests.helpers import train_args


def conversations(count: int) -> list[dict]:
    rows = []
    for i in range(count):
        a, b = i % 7, (3 * i) % 5
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer with a number."},
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": str(a + b)},
                ],
                "task": "add" if i % 2 else "sum",
            }
        )
    return rows


def read_log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_validation_loss_every_eval_steps_and_the_best_adapter_kept(tmp_path, tiny_model_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in conversations(24)))
    args = train_args(
        tiny_model_dir,
        tmp_path / "run",
        data=[str(data)],
        train_limit=None,
        val_fraction=0.25,
        eval_steps=2,
        save_best=True,
        max_steps=6,
        save_steps=0,
        lr=3e-2,
    )
    run = train(args)
    rows = read_log(run)
    validated = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in validated] == [2, 4, 6]
    assert all({"val_loss/add", "val_loss/sum"} <= set(row) for row in validated)
    assert validated[-1]["val_loss"] < validated[0]["val_loss"]  # lr 3e-2: the tiny model learns the format
    best = json.loads((run / "best-adapter" / "validation.json").read_text())
    lowest = min(validated, key=lambda row: row["val_loss"])
    assert best == {"step": lowest["step"], "val_loss": lowest["val_loss"]}
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    kept = load_file(run / "best-adapter" / "adapter_model.safetensors")
    same = all(torch.equal(final[name], kept[name]) for name in final)
    assert same == (lowest["step"] == 6)
    record = json.loads((run / "adapter" / DATA_RECORD).read_text())
    assert record["template"] == "chat" and set(record["tasks"]) == {"add", "sum"}
    assert sum(task["examples"] for task in record["tasks"].values()) == 18  # 24 minus 6 held out

    # The logged value is the per-token validation loss of the saved best adapter, recomputed here.
    model, tokenizer = load_base(str(tiny_model_dir))
    model = load_adapter(model, str(run / "best-adapter"))
    examples = examples_from_records(conversations(24), "chat", "chat")
    _, held = split_validation(examples, 0.25, seed=0)
    items, _ = encode_examples(tokenizer, held, 256)
    names = ["sum", "add"]
    ids = [names.index(e.task) for e in held]
    again = validation_loss(model, items, ids, names, batch_size=5, pad_id=tokenizer.pad_token_id)
    assert abs(again["val_loss"] - best["val_loss"]) < 1e-4


def test_python_dataset_trains_and_uses_its_validation_split(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Copy {i}:", "completion": f" {i}"} for i in range(12)]
    dataset = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:8]), "validation": datasets.Dataset.from_list(rows[8:])}
    )
    run = train(train_args(tiny_model_dir, tmp_path / "run", train_limit=None, max_steps=2), dataset=dataset)
    assert "val_loss" in read_log(run)[-1]
    record = json.loads((run / "adapter" / DATA_RECORD).read_text())
    assert record["template"] == "none" and list(record["tasks"]) == ["data"]
    assert record["tasks"]["data"]["examples"] == 8 and record["tasks"]["data"]["template"] == "none"
    assert record["tasks"]["data"]["distinct_answers"] == 8  # the completions " 0" ... " 7"
    listed = train(
        train_args(tiny_model_dir, tmp_path / "listed", train_limit=None, max_steps=2), dataset=rows
    )
    assert "val_loss" not in read_log(listed)[-1]


def test_generate_equals_model_generate_and_eval_prompts_as_trained(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in conversations(8)))
    run = train(train_args(tiny_model_dir, tmp_path / "run", data=[str(data)], train_limit=None, max_steps=2))
    adapter = str(run / "adapter")
    out = tmp_path / "answers.jsonl"
    argv = ["generate", "--model", str(tiny_model_dir), "--adapter", adapter, "--prompt", "What is 2 + 3?"]
    assert main([*argv, "--max-new-tokens", "6", "--output", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]

    model, tokenizer = load_base(str(tiny_model_dir))
    model = load_adapter(model, adapter)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    expected = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert row["response"] == tokenizer.decode(
        expected[0, ids["input_ids"].shape[1] :], skip_special_tokens=True
    )

    # Instruction records evaluated with a chat-trained adapter are prompted with the chat template.
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"instruction": "What is 1 + 1?", "answer": "2"}) + "\n")
    (example,) = eval_examples(EvalArgs(model=str(tiny_model_dir), adapter=adapter, data=[str(items)]))
    assert example.messages == (("user", "What is 1 + 1?"), ("assistant", "2"))
    (plain,) = eval_examples(EvalArgs(model=str(tiny_model_dir), data=[str(items)]))
    assert plain.messages == ()


def test_analyze_groups_your_data_by_its_tasks(tmp_path, tiny_model_dir):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in conversations(8)))
    run = train(train_args(tiny_model_dir, tmp_path / "run", data=[str(data)], train_limit=None, max_steps=1))
    out = tmp_path / "analysis"
    argv = ["analyze", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"), "--data", str(data)]
    assert main([*argv, "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == ["sum", "add"] and summary["examples"] == 8
