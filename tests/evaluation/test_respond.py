"""`comoe generate`'s prompts: read from a text or JSONL file, and each an example carrying the template it
is rendered with (nothing registered); --task routes them by one of a task-routed adapter's tasks."""

import json

import pytest
import torch

import comoe.evaluation.respond as respond
from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.cli import main
from comoe.data import TASKS
from comoe.data.collate import prompt_ids
from comoe.data.prompts import render_prompt
from comoe.evaluation.respond import PROMPT_TASK, prompt_example, read_prompt_rows, read_prompts, unknown_task
from comoe.evaluation.settings import GenerateArgs
from comoe.models.loading import load_base
from tests.helpers import argmax_loop, one_line_error, task_routed, tiny_llama, token_ids, write_jsonl


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


def test_a_prompt_carries_its_template_and_registers_nothing(smol_tokenizer):
    plain = prompt_example("2+2?", "none")
    assert (plain.task, plain.template, render_prompt(plain)) == (PROMPT_TASK, "none", "2+2?")
    assert render_prompt(prompt_example("2+2?", "alpaca")).endswith(
        "### Instruction:\n2+2?\n\n### Response:\n"
    )
    chat = prompt_example("2+2?", "chat")
    rendered = render_prompt(chat, smol_tokenizer)  # SmolLM2's template adds its default system turn
    assert rendered.endswith("<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert PROMPT_TASK not in TASKS
    with pytest.raises(ValueError, match="task 'prompt' template='jinja' is invalid"):
        prompt_example("2+2?", "jinja")


def test_generation_fits_the_models_context(tiny_gpt2_dir, smol_tokenizer, tmp_path, capsys):
    """A GPT-2 of 32 positions: a long prompt is cut from its start to leave room for the answer; a
    max_new_tokens that leaves no room (the default 128) is fitted with a warning, the response stopping at
    the context; eval's default length halves to fit."""
    model = ["--model", str(tiny_gpt2_dir)]
    assert main(["generate", *model, "--prompt", "sun " * 40, "--max-new-tokens", "8"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["truncated"] is True
    assert main(["generate", *model, "--prompt", "sun " * 40]) == 0  # --max-new-tokens 128
    out, err = capsys.readouterr()
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["truncated"] is True and len(token_ids(smol_tokenizer, row["response"])) <= 16
    warning = (
        "max_new_tokens=128 does not fit the model's context of 32 tokens: prompts keep their last 16 tokens"
    )
    assert sum(warning in line for line in err.splitlines()) == 1
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "sun " * 40, "completion": "moon"}) + "\n")
    report = tmp_path / "eval.json"
    assert main(["eval", *model, "--data", str(data), "--mode", "generate", "--output", str(report)]) == 0
    assert json.loads(report.read_text())["max_new_tokens"] == 16


def test_prompts_of_a_task_routed_adapter_use_the_mean_gate_and_others_are_unchanged(caplog):
    routed = get_comoe_model(tiny_llama(), ComoeConfig.preset("moelora-liu", tasks=["a", "b"], r=4))
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = routed(input_ids=ids, task_ids=torch.tensor([-1, -1])).logits
        with caplog.at_level("WARNING", logger="comoe"), unknown_task(routed):
            torch.testing.assert_close(routed(input_ids=ids).logits, expected)
    assert "prompts carry no task" in caplog.text and "pass --task NAME" in caplog.text
    caplog.clear()
    for other in ("comoe", "loramoe"):  # no task ids at inference: nothing set, nothing said
        model = get_comoe_model(tiny_llama(), ComoeConfig.preset(other, tasks=["a"], r=4))
        with unknown_task(model):
            assert model._default_inputs == {}
    assert "prompts carry no task" not in caplog.text


@pytest.fixture(scope="module")
def routed_folders(tmp_path_factory, tiny_model_dir) -> dict:
    """An adapter folder of each preset that reads task ids (tasks a, b) on the tiny base, as if trained."""
    folders = {}
    for preset in ("moelora-liu", "loramoe"):
        folders[preset] = tmp_path_factory.mktemp(preset)
        task_routed(load_base(str(tiny_model_dir))[0], preset).save_pretrained(folders[preset])
    return folders


def test_generate_routes_its_prompts_by_the_task_given(
    routed_folders, tiny_model_dir, smol_tokenizer, tmp_path, capsys
):
    """--task a and --task b give other responses (the tasks' gates differ), each the argmax loop's with
    that task's id on every call; without --task, the mean gate (id -1) and one warning naming --task."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 + 3?\nName a colour.\n")
    folder = routed_folders["moelora-liu"]
    model = ComoeModel.from_pretrained(load_base(str(tiny_model_dir))[0], folder).eval()
    responses = {}
    for task_id, task in [(0, "a"), (1, "b"), (-1, None)]:
        argv = ["generate", "--adapter", str(folder), "--prompts", str(prompts), "--max-new-tokens", "5"]
        assert main(argv + (["--task", task] if task else [])) == 0
        out, err = capsys.readouterr()
        rows = [json.loads(line) for line in out.splitlines()]
        warned = [line for line in err.splitlines() if "prompts carry no task" in line]
        assert len(warned) == (0 if task else 1) and all("pass --task NAME" in line for line in warned)
        for row in rows:
            ids = prompt_ids(smol_tokenizer, render_prompt(prompt_example(row["prompt"], "none")))
            expected = argmax_loop(model, smol_tokenizer, ids, 5, task_ids=torch.tensor([task_id]))
            assert row["response"] == expected
        responses[task] = [row["response"] for row in rows]
    assert responses["a"] != responses["b"]


def test_a_task_generate_cannot_route_by_is_one_line_before_the_base_loads(
    routed_folders, tiny_model_dir, capsys, monkeypatch
):
    def no_load(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(respond, "load_for_eval", no_load)
    prompt = ["--prompt", "hi", "--max-new-tokens", "2"]
    refused = {
        ("--adapter", str(routed_folders["moelora-liu"]), "--task", "c"): (
            "--task='c' is invalid: expected one of the adapter's tasks: 'a', 'b'"
        ),
        ("--adapter", str(routed_folders["loramoe"]), "--task", "a"): (
            "--task='a' is invalid: this adapter's routing ('soft') reads no task (its task vocabulary is not read "
            "at inference), so its outputs are the same for every task"
        ),
        ("--model", str(tiny_model_dir), "--task", "a"): (
            "--task='a' is invalid: the model has no comoe adapter, so its outputs are the same for every task"
        ),
    }
    for flags, message in refused.items():
        line = one_line_error(capsys, ["generate", *flags, *prompt])
        assert line.startswith(f"comoe: error: {message}"), line


def test_jsonl_prompt_rows_carry_an_optional_task(tmp_path):
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"task": "sum", "prompt": "5 + 2?"}\n{"prompt": "Hi"}\n{"task": null, "prompt": "x"}\n')
    assert read_prompt_rows(GenerateArgs(prompts=str(rows))) == (["5 + 2?", "Hi", "x"], ["sum", None, None])
    text = tmp_path / "p.txt"
    text.write_text('{"task": "sum"}\n')  # a text file's line is a prompt, whatever it looks like
    assert read_prompt_rows(GenerateArgs(prompts=str(text))) == (['{"task": "sum"}'], [None])
    for bad, message in [('""', "field 'task' is empty"), ("3", "'task'")]:
        rows.write_text(f'{{"task": {bad}, "prompt": "p"}}\n')
        with pytest.raises(ValueError, match=f"line 1: .*{message}"):
            read_prompt_rows(GenerateArgs(prompts=str(rows)))


def generated(capsys, argv) -> tuple[list[str], str]:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    return [json.loads(line)["response"] for line in out.splitlines()], err


def test_generate_routes_each_jsonl_row_by_its_own_task(
    routed_folders, tiny_model_dir, smol_tokenizer, tmp_path, capsys
):
    """Rows of tasks a, b, c (unseen) and none, in one batch: each response is the argmax loop's with its
    own id (c and the untagged row: -1, the mean gate, each warned of once, as comoe eval warns); --task b
    routes every row by b, overriding theirs; an adapter that does not route by task takes the rows' tasks as
    data (no warning, the same responses as without them)."""
    rows = [
        {"task": "a", "prompt": "What is 2 + 3?"},
        {"task": "b", "prompt": "Name a colour."},
        {"task": "c", "prompt": "Capital of Peru?"},
        {"task": "b", "prompt": "Capital of Peru?"},
        {"prompt": "What is 2 + 3?"},
    ]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    folder = routed_folders["moelora-liu"]
    model = ComoeModel.from_pretrained(load_base(str(tiny_model_dir))[0], folder).eval()
    argv = ["generate", "--adapter", str(folder), "--prompts", str(prompts), "--max-new-tokens", "5"]

    def expected(task_ids: list[int]) -> list[str]:
        return [
            argmax_loop(model, smol_tokenizer, token_ids_of(row["prompt"]), 5, task_ids=torch.tensor([task_id]))
            for row, task_id in zip(rows, task_ids, strict=True)
        ]

    def token_ids_of(prompt: str) -> list[int]:
        return prompt_ids(smol_tokenizer, render_prompt(prompt_example(prompt, "none")))

    responses, err = generated(capsys, [*argv, "--batch-size", "5"])
    assert responses == expected([0, 1, -1, 1, -1])
    assert responses[2] != responses[3]  # the same prompt, routed by another gate
    unseen = "tasks ['c'] are not among the adapter's training tasks ['a', 'b']"
    assert sum(unseen in line for line in err.splitlines()) == 1
    assert sum("1 of 5 prompts carry no task" in line for line in err.splitlines()) == 1
    assert "prompts carry no task: the adapter routes by task" not in err  # rows do carry tasks
    responses, err = generated(capsys, [*argv, "--task", "b"])
    assert responses == expected([1] * 5) and "not among" not in err
    loramoe = ["generate", "--adapter", str(routed_folders["loramoe"]), "--max-new-tokens", "3", "--prompts"]
    with_tasks, err = generated(capsys, [*loramoe, str(prompts)])
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": row["prompt"]} for row in rows])
    assert with_tasks == generated(capsys, [*loramoe, str(plain)])[0]
    assert "task" not in err
