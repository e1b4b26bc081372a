"""comoe.training.batches: every example once per epoch in a seeded order, resume from any micro-batch, and
N processes splitting each global micro-batch as one process would see it."""

import itertools

import pytest
import torch

from comoe.data.collate import IGNORE_INDEX, Tokenized
from comoe.training.batches import micro_batches
from comoe.training.distributed import SINGLE, World
from comoe.training.settings import TrainArgs

PAD = 0


def items(count: int) -> list[Tokenized]:
    """Example i is i % 4 + 1 tokens of value i + 1 (lengths differ, so batches are padded)."""
    return [Tokenized([i + 1] * (i % 4 + 1), [IGNORE_INDEX] + [i + 1] * (i % 4), False) for i in range(count)]


def take(count: int, examples: int, batch_size: int, seed: int = 0, start: int = 0, world: World = SINGLE):
    args = TrainArgs(batch_size=batch_size, seed=seed)
    stream = micro_batches(items(examples), list(range(examples)), args, PAD, start, world)
    return list(itertools.islice(stream, count))


@pytest.mark.parametrize(("examples", "batch_size"), [(10, 3), (12, 4), (5, 8), (1, 1)])
def test_each_epoch_holds_every_example_exactly_once(examples, batch_size):
    per_epoch = -(-examples // batch_size)
    batches = take(3 * per_epoch, examples, batch_size)
    for epoch in range(3):
        seen = [
            i for b in batches[epoch * per_epoch : (epoch + 1) * per_epoch] for i in b["task_ids"].tolist()
        ]
        assert sorted(seen) == list(range(examples))
    assert all(len(b["task_ids"]) <= batch_size for b in batches)


def test_the_order_is_seeded_and_changes_between_epochs():
    first = [b["task_ids"].tolist() for b in take(8, 16, 4, seed=3)]
    assert first == [b["task_ids"].tolist() for b in take(8, 16, 4, seed=3)]
    assert first != [b["task_ids"].tolist() for b in take(8, 16, 4, seed=4)]
    assert first[:4] != first[4:]  # epoch 1 is not a repeat of epoch 0
    expected = torch.randperm(16, generator=torch.Generator().manual_seed(3 * 1000 + 1)).tolist()
    assert sum(first[4:], []) == expected


@pytest.mark.parametrize("start", [0, 1, 3, 4, 7])
def test_resuming_at_a_micro_batch_continues_the_same_stream(start):
    straight = take(start + 5, 10, 3, seed=1)
    resumed = take(5, 10, 3, seed=1, start=start)
    for a, b in zip(straight[start:], resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_batches_are_the_examples_tokens_padded_with_task_ids():
    (batch,) = take(1, 6, 6)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
    for row, index in enumerate(batch["task_ids"].tolist()):
        length = index % 4 + 1
        assert batch["input_ids"][row, :length].tolist() == [index + 1] * length
        assert batch["input_ids"][row, length:].eq(PAD).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (4 - length)
        assert (
            batch["labels"][row, 0] == IGNORE_INDEX and batch["labels"][row, length:].eq(IGNORE_INDEX).all()
        )


@pytest.mark.parametrize(("examples", "batch_size", "size"), [(12, 2, 3), (16, 4, 2), (7, 2, 2), (5, 3, 3)])
def test_processes_split_each_global_batch_into_what_one_process_would_see(examples, batch_size, size):
    steps = 2 * -(-examples // (batch_size * size))
    single = take(steps, examples, batch_size * size, seed=2)
    ranks = [take(steps, examples, batch_size, seed=2, world=World(rank, size)) for rank in range(size)]
    for step, whole in enumerate(single):
        parts = [ranks[rank][step]["task_ids"].tolist() for rank in range(size)]
        ids = whole["task_ids"].tolist()
        for rank, part in enumerate(parts):
            expected = ids[rank * batch_size : (rank + 1) * batch_size] or ids[-1:]  # never an empty batch
            assert part == expected, (step, rank)
