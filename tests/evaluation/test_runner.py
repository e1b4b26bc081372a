"""Option log-likelihoods against a plain per-option loop, over-long prompts (answer extraction and scoring
are in test_scoring.py), and several adapters evaluated on one loaded base, one report each."""

import json
import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

import comoe.models.auto as auto
from comoe.adapter.model import get_comoe_model
from comoe.cli import main
from comoe.config import ComoeConfig
from comoe.data import Example
from comoe.data.record import write_data_record
from comoe.data.sources import examples_from_records
from comoe.data.templates import format_prompt
from comoe.evaluation.loglik import option_loglikelihoods
from comoe.evaluation.runner import predict, run_eval, run_evals
from comoe.evaluation.scoring import Prediction, choice_options, choice_response, summarise
from comoe.evaluation.settings import EvalArgs
from comoe.models import load_base
from tests.helpers import tiny_llama


def test_option_loglikelihoods_equal_a_plain_loop(smol_tokenizer):
    model = tiny_llama(vocab=len(smol_tokenizer))
    examples = [
        Example(
            "boolq", "Is the sky blue?\n\nAnswer format: true/false", "", "the correct answer is true", "true"
        ),
        Example(
            "piqa",
            "Open a jar?\n\nSolution1: twist Solution2: bite\n\nAnswer format: solution1/solution2",
            "",
            "the correct answer is solution1",
            "solution1",
        ),
        Example(
            "ARC-Easy",
            "Pick.\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3",
            "",
            "the correct answer is answer3",
            "answer3",
        ),
    ]
    batched, truncated = option_loglikelihoods(model, smol_tokenizer, examples, batch_size=4)
    assert truncated == [False] * len(examples)
    for example, scores in zip(examples, batched, strict=True):
        prompt_ids = smol_tokenizer(format_prompt(example.instruction), add_special_tokens=False)["input_ids"]
        for option, score in zip(choice_options(example), scores, strict=True):
            response = smol_tokenizer(choice_response(option), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + response + [smol_tokenizer.eos_token_id]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            targets = ids[0, 1:]
            expected = sum(
                float(logprobs[p, targets[p]]) for p in range(len(prompt_ids) - 1, ids.shape[1] - 1)
            )
            assert score == pytest.approx(expected, abs=1e-3)


def test_prompts_longer_than_the_window_are_scored_whole_and_reported(smol_tokenizer):
    """Finding 3 of the reliability review: an over-long prompt scored every option 0.0 (the first won)."""
    model = tiny_llama(vocab=len(smol_tokenizer))
    long = Example(
        "boolq", "word " * 300 + "\n\nAnswer format: true/false", "", "the correct answer is true", "true"
    )
    short = Example(
        "boolq", "Is it?\n\nAnswer format: true/false", "", "the correct answer is false", "false"
    )
    window = 64
    scores, truncated = option_loglikelihoods(
        model, smol_tokenizer, [long, short], batch_size=2, window=window
    )
    assert truncated == [True, False]
    prompt_ids = smol_tokenizer(format_prompt(long.instruction), add_special_tokens=False)["input_ids"]
    for option, score in zip(["true", "false"], scores[0], strict=True):
        response = smol_tokenizer(choice_response(option), add_special_tokens=False)["input_ids"]
        response += [smol_tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids[len(prompt_ids) + len(response) - window :] + response])
        assert ids.shape[1] == window
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        expected = sum(
            float(logprobs[p, ids[0, p + 1]]) for p in range(window - len(response) - 1, window - 1)
        )
        assert score == pytest.approx(expected, abs=1e-3) and score < 0
    report = summarise(
        [
            Prediction("boolq", "true", "true", True, truncated=True),
            Prediction("boolq", "true", "false", False),
        ]
    )
    assert report["tasks"]["boolq"]["truncated"] == 1


def choice_records(count: int, seed: int = 0) -> list[dict]:
    """Multiple-choice prompt/completion records of two tasks (3-way and yes/no) with explicit choices."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        colour = rng.choice(["red", "blue", "green"])
        fruit = {"red": " apple", "blue": " sky", "green": " grass"}[colour]
        rows.append(
            {
                "task": "colour",
                "prompt": f"q{i} {colour}",
                "completion": fruit,
                "choices": [" apple", " sky", " grass"],
            }
        )
        light = rng.choice([" yes", " no"])
        rows.append(
            {"task": "light", "prompt": f"q{i} light{light}", "completion": light, "choices": [" yes", " no"]}
        )
    return rows


@pytest.fixture
def two_adapters(tmp_path, tiny_model_dir):
    """A comoe adapter (with a data record) and a PEFT LoRA one, both of non-zero B, on the tiny model."""
    base, _ = load_base(str(tiny_model_dir))
    torch.manual_seed(0)
    comoe = get_comoe_model(base, ComoeConfig.preset("comoe", r=4, num_experts=2))
    for layer in comoe.comoe_layers().values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    comoe.save_pretrained(tmp_path / "comoe" / "adapter")
    write_data_record(
        tmp_path / "comoe" / "adapter", examples_from_records(choice_records(6, seed=1), "x", "none")
    )
    lora = get_peft_model(
        comoe.unload(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "lora" / "adapter")
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in choice_records(5)))
    return str(tmp_path / "comoe" / "adapter"), str(tmp_path / "lora" / "adapter"), str(data)


def test_several_adapters_are_evaluated_on_one_base_load_one_report_each(tmp_path, two_adapters, monkeypatch):
    comoe, lora, data = two_adapters
    loads = []
    real = auto.load_base
    monkeypatch.setattr(auto, "load_base", lambda *a, **k: loads.append(a) or real(*a, **k))
    settings = dict(data=[data], device="cpu", batch_size=4)
    output = tmp_path / "out" / "eval.json"
    reports, comparison = run_evals(
        EvalArgs(adapter=[comoe, lora], with_base=True, output=str(output), **settings)
    )
    assert len(loads) == 1  # the base once, the adapters in turn on it
    assert [r["label"] for r in reports] == ["base", "comoe/adapter", "lora/adapter"]
    assert [r["adapter"] for r in reports] == [None, comoe, lora]
    names = [
        "eval.base.json",
        "eval.comoe-adapter.json",
        "eval.lora-adapter.json",
        "eval.compare.json",
        "eval.md",
        "eval.png",
    ]
    assert sorted(p.name for p in output.parent.iterdir()) == sorted(names)
    assert json.loads((output.parent / "eval.lora-adapter.json").read_text()) == reports[2]
    assert [c["label"] for c in comparison["comparisons"]] == [
        "comoe/adapter − base",
        "lora/adapter − base",
        "lora/adapter − comoe/adapter",
    ]
    # each model's answers are those of evaluating it alone: the base comes back whole after each adapter
    for adapter, report in zip([None, comoe, lora], reports, strict=True):
        alone = run_eval(
            EvalArgs(adapter=adapter, model=None if adapter else reports[0]["model"], **settings)
        )
        assert alone["examples"] == report["examples"], adapter
    assert reports[1]["tasks"]["colour"]["train_majority"]["train_share"] > 0  # its data record
    assert reports[2]["tasks"]["colour"]["train_majority"] is None  # none recorded
    assert reports[0]["tasks"]["colour"]["chance"] == pytest.approx(1 / 3)
    assert all(row["question"] and row["options"] in (2, 3) for row in reports[0]["examples"])
    with pytest.raises(ValueError, match="run_eval evaluates one model; use run_evals for several"):
        run_eval(EvalArgs(adapter=[comoe, lora], **settings))


def test_a_task_routed_adapter_first_leaves_the_base_clean_for_the_next(tmp_path, two_adapters, tiny_model_dir):
    _, lora, data = two_adapters
    base, _ = load_base(str(tiny_model_dir))
    torch.manual_seed(0)
    routed = get_comoe_model(base, ComoeConfig.preset("moelora-liu", r=2, tasks=["colour", "light"]))
    routed.save_pretrained(tmp_path / "liu" / "adapter")
    liu = str(tmp_path / "liu" / "adapter")
    settings = dict(data=[data], device="cpu", batch_size=4)
    reports, _ = run_evals(EvalArgs(adapter=[liu, lora], **settings))
    assert [r["adapter"] for r in reports] == [liu, lora]
    assert reports[1]["examples"] == run_eval(EvalArgs(adapter=lora, **settings))["examples"]


@pytest.mark.parametrize(("preset", "warned"), [("moelora-liu", True), ("loramoe", False)])
def test_a_task_outside_the_vocabulary_is_warned_of_only_where_routing_reads_it(
    smol_tokenizer, caplog, preset, warned
):
    """moelora-liu routes an unknown task by the mean gate (warned); loramoe's tasks weigh its training loss
    only, so its routing of an unknown task is its routing of any other (no warning)."""
    config = ComoeConfig.preset(preset, tasks=["a", "b"])
    model = get_comoe_model(tiny_llama(vocab=len(smol_tokenizer)), config)
    examples = [Example("c", "Colour of the sky?", "", "blue", "blue", template="none", scoring="exact")]
    with caplog.at_level("WARNING", logger="comoe"):
        (prediction,) = predict(model.eval(), smol_tokenizer, examples, "generate", max_new_tokens=1)
    assert isinstance(prediction, Prediction)
    assert ("tasks ['c'] are not among the adapter's training tasks" in caplog.text) is warned


def test_adapters_of_different_bases_are_refused_before_loading(tmp_path, two_adapters):
    comoe, lora, data = two_adapters
    config = Path(lora) / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "gpt2"}))
    with pytest.raises(
        ValueError, match=f"{comoe} was trained on base model .* and {lora} on gpt2: adapters"
    ):
        run_evals(EvalArgs(adapter=[comoe, lora], data=[data], device="cpu"))


@pytest.mark.slow
def test_a_collapsed_adapter_is_warned_of_and_a_learned_one_is_not(tmp_path, tiny_model_dir, capsys):
    """The issue's run on data of our own: two multiple-choice tasks (3-way, yes/no), an adapter trained on
    answers that are all ' sky' / ' yes' (it answers nothing else) and one trained on balanced answers, both
    evaluated on the same questions in one run; `comoe compare` gives the paired verdict."""
    balanced, test = choice_records(75, seed=1), choice_records(30, seed=2)
    skewed = [{**row, "completion": " sky" if row["task"] == "colour" else " yes"} for row in balanced]
    for name, rows in (("balanced", balanced), ("skewed", skewed), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name, preset, data in (("collapsed", "lora", "skewed"), ("learned", "comoe", "balanced")):
        argv = [
            "train",
            "--model",
            str(tiny_model_dir),
            "--preset",
            preset,
            "--data",
            str(tmp_path / f"{data}.jsonl"),
        ]
        argv += ["--max-steps", "60", "--lr", "0.01", "--batch-size", "8", "--output", str(tmp_path / name)]
        assert main(argv) == 0
    capsys.readouterr()
    adapters = [str(tmp_path / name / "adapter") for name in ("collapsed", "learned")]
    argv = [
        "eval",
        "--data",
        str(tmp_path / "test.jsonl"),
        "--adapter",
        adapters[0],
        "--adapter",
        adapters[1],
    ]
    assert main([*argv, "--output", str(tmp_path / "eval.json"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("warning: ")]
    assert any(
        line.startswith("warning: collapsed/adapter: colour: predictions collapsed: ' sky' for 30 of 30")
        for line in warnings
    )
    assert not [line for line in warnings if "learned/adapter" in line], warnings
    assert "learned/adapter − collapsed/adapter (accuracy %, difference in points)" in printed
    assert "verdict: learned/adapter is better than collapsed/adapter on these questions" in printed
    reports = [str(tmp_path / f"eval.{name}-adapter.json") for name in ("collapsed", "learned")]
    assert main(["compare", *reports]) == 0
    assert "verdict: learned/adapter is better than collapsed/adapter" in capsys.readouterr().out
