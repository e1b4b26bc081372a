"""Answer extraction, scoring, and option log-likelihoods against a plain per-option loop."""

import pytest
import torch

from comoe.data import Example
from comoe.data.templates import format_prompt
from comoe.evaluation.loglik import option_loglikelihoods
from comoe.evaluation.scoring import (
    Prediction,
    choice_options,
    choice_response,
    extract_answer,
    is_correct,
    summarise,
    wilson_interval,
)
from tests.helpers import tiny_llama


@pytest.mark.parametrize(
    ("kind", "text", "options", "expected"),
    [
        ("choice", "the correct answer is false", ["true", "false"], "false"),
        (
            "choice",
            "the correct answer is solution2. solution1 is wrong",
            ["solution1", "solution2"],
            "solution2",
        ),
        ("choice", "I think option1", ["option1", "option2"], "option1"),
        ("choice", "no idea", ["answer1", "answer2"], None),
        ("number", "\nA: 36 * 2/3 = 24 sq ft. 24 * 24 = 576 tiles. The answer is 576.", None, "576"),
        ("number", "She has 1,250 apples and gives -3.5 away. The answer is 1,246.5", None, "1246.5"),
        ("number", "The answer is unknown", None, None),
        ("letter", "A: the difference is $1.23. The answer is (D).", None, "D"),
        ("letter", "Rationale: ... so it is B", None, "B"),
        ("exact", "ainomma\n### extra", None, "ainomma"),
    ],
)
def test_extract_answer_on_realistic_outputs(kind, text, options, expected):
    assert extract_answer(kind, text, options) == expected


def test_is_correct_uses_tolerance_for_numbers():
    assert is_correct("number", "576", "576.0") and is_correct("number", "0.3334", "0.3333")
    assert not is_correct("number", "577", "576.0") and not is_correct("number", None, "1")
    assert is_correct("exact", "Yes.", "yes") and not is_correct("choice", "answer1", "answer2")


def test_wilson_interval_known_values():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 0) == [0.0, 0.0]


def test_summarise_accuracy_per_task():
    preds = [
        Prediction("a", "1", "1", True),
        Prediction("a", "1", "2", False),
        Prediction("b", "x", "x", True),
    ]
    report = summarise(preds)
    assert report["tasks"]["a"]["accuracy"] == 0.5 and report["tasks"]["b"]["n"] == 1
    assert report["average"] == 0.75


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
