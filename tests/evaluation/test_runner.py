"""Option log-likelihoods against a plain per-option loop, and over-long prompts (answer extraction and
scoring are in test_scoring.py)."""

import pytest
import torch

from comoe.data import Example
from comoe.data.templates import format_prompt
from comoe.evaluation.loglik import option_loglikelihoods
from comoe.evaluation.scoring import Prediction, choice_options, choice_response, summarise
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
