"""comoe.evaluation.generation: batched greedy generation with left padding equals a plain argmax loop per
prompt (with a task-routed adapter, the loop given the task's id on every call); over-long prompts are cut
from their start to fit the context and reported."""

import pytest
import torch

from comoe.data import Example
from comoe.data.collate import prompt_ids
from comoe.data.prompts import render_prompt
from comoe.evaluation.generation import generate_responses, left_pad
from tests.helpers import argmax_loop, task_routed, tiny_llama


def examples() -> list[Example]:
    return [
        Example("gcd", "What is the gcd of 12 and 18?", "", "", "6"),
        Example("boolq", "Is water wet?\n\nAnswer format: true/false", "", "", "true"),
        Example("chain_sum", "Add 1, 2, 3 and 4 and then subtract 5 from the total", "", "", "5"),
    ]


def test_batched_greedy_generation_equals_an_argmax_loop(smol_tokenizer):
    model = tiny_llama(vocab=len(smol_tokenizer))
    items = examples()
    responses, truncated = generate_responses(model, smol_tokenizer, items, batch_size=2, max_new_tokens=5)
    assert truncated == [False, False, False]
    for example, response in zip(items, responses, strict=True):
        ids = prompt_ids(smol_tokenizer, render_prompt(example, smol_tokenizer))
        assert response == argmax_loop(model, smol_tokenizer, ids, 5)
    assert any(responses)  # a random model still says something
    one_at_a_time, _ = generate_responses(model, smol_tokenizer, items, batch_size=1, max_new_tokens=5)
    assert one_at_a_time == responses  # left padding changes nothing


def test_an_over_long_prompt_keeps_its_end_and_is_reported(smol_tokenizer):
    model = tiny_llama(vocab=len(smol_tokenizer))  # 128 positions
    long = Example("gcd", "word " * 200 + "What is the gcd of 4 and 6?", "", "", "2")
    short = examples()[0]
    responses, truncated = generate_responses(
        model, smol_tokenizer, [long, short], batch_size=2, max_new_tokens=4
    )
    assert truncated == [True, False]
    ids = prompt_ids(smol_tokenizer, render_prompt(long, smol_tokenizer))
    assert len(ids) > 124
    assert responses[0] == argmax_loop(model, smol_tokenizer, ids[-124:], 4)  # 128 - 4 new tokens of room


def test_left_pad_aligns_every_prompt_to_the_right():
    batch = left_pad([[5, 6, 7], [8], [9, 10]], pad_token_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch["input_ids"].dtype == torch.long


@pytest.mark.parametrize("pad", [0, 2])
def test_left_padding_gives_the_unpadded_next_token_logits(pad):
    model = tiny_llama()
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    batch = left_pad(prompts, pad, torch.device("cpu"))
    with torch.no_grad():
        padded = model(**batch).logits[:, -1]
        for row, prompt in enumerate(prompts):
            alone = model(input_ids=torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(padded[row], alone, rtol=1e-4, atol=1e-5)


def test_generation_routes_every_prompt_and_step_by_the_task_given(smol_tokenizer):
    """task=NAME: the KV-cached, left-padded generation of every prompt equals the argmax loop given that
    task's id on every call; the two tasks' gates differ, and so do their responses."""
    model = task_routed(tiny_llama(vocab=len(smol_tokenizer)))
    items = examples()
    by_task = {}
    for task_id, task in enumerate(["a", "b"]):
        by_task[task], _ = generate_responses(
            model, smol_tokenizer, items, batch_size=2, max_new_tokens=5, task=task
        )
        for example, response in zip(items, by_task[task], strict=True):
            ids = prompt_ids(smol_tokenizer, render_prompt(example, smol_tokenizer))
            assert response == argmax_loop(model, smol_tokenizer, ids, 5, task_ids=torch.tensor([task_id]))
    assert by_task["a"] != by_task["b"]
    # the task held for that call only; the error names this entry's keyword, not the model's task_ids
    with pytest.raises(ValueError, match=r"^task: missing; .*its tasks: 'a', 'b'.*: pass task='NAME'"):
        generate_responses(model, smol_tokenizer, items, batch_size=2, max_new_tokens=5)
    # one id per example, mixed within a batch: each row is the argmax loop of its own task
    ids = [1, -1, 0]
    mixed, _ = generate_responses(model, smol_tokenizer, items, batch_size=3, max_new_tokens=5, task_ids=ids)
    for example, task_id, response in zip(items, ids, mixed, strict=True):
        prompt = prompt_ids(smol_tokenizer, render_prompt(example, smol_tokenizer))
        assert response == argmax_loop(model, smol_tokenizer, prompt, 5, task_ids=torch.tensor([task_id]))
    with pytest.raises(ValueError, match="give one of them"):
        generate_responses(model, smol_tokenizer, items, 2, 5, task="a", task_ids=ids)
    with pytest.raises(ValueError, match="^task_ids: 1 ids for"):
        generate_responses(model, smol_tokenizer, items, 2, 5, task_ids=[0])
    with model.default_call_inputs(task_ids=[0]):  # the caller's ids: no task needed
        assert generate_responses(model, smol_tokenizer, items, 2, 5)[0] == by_task["a"]
    with model.disable_adapters():  # the base alone reads no task
        generate_responses(model, smol_tokenizer, items[:1], 1, 1)


def test_a_task_outside_the_vocabulary_or_for_a_model_not_routed_by_task_is_refused(smol_tokenizer):
    routed = task_routed(tiny_llama(vocab=len(smol_tokenizer)))
    items = examples()[:1]
    with pytest.raises(ValueError, match="^task='c' is invalid: expected one of the adapter's tasks: 'a', 'b'$"):
        generate_responses(routed, smol_tokenizer, items, batch_size=1, max_new_tokens=2, task="c")
    loramoe = task_routed(tiny_llama(vocab=len(smol_tokenizer)), "loramoe")
    reasons = {
        r"routing \('soft'\) reads no task \(its task vocabulary is not read at inference\)": loramoe,
        "the model has no comoe adapter": tiny_llama(vocab=len(smol_tokenizer)),
    }
    for reason, model in reasons.items():
        with pytest.raises(ValueError, match=f"^task='a' is invalid: .*{reason}, so its outputs are the same"):
            generate_responses(model, smol_tokenizer, items, batch_size=1, max_new_tokens=2, task="a")
