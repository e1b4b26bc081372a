"""Built-in multi-task data: deterministic generators from reasoning-gym, no download needed."""

from __future__ import annotations

from typing import Any

from comoe.data.example import Example

# Five clearly different skills, so a router has something to specialise on: arithmetic, string
# manipulation, counting, relational reasoning and logic. Generator name and its settings.
BUILTIN_TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "chain_sum": ("chain_sum", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)),
    "spell_backward": ("spell_backward", dict(min_word_len=3, max_word_len=6)),
    "letter_counting": ("letter_counting", dict(min_words=3, max_words=6)),
    "family_relationships": ("family_relationships", dict(min_family_size=3, max_family_size=5)),
    "syllogism": ("syllogism", {}),
}
# reasoning-gym seeds item i with seed + i, so the splits use seeds far apart.
_SPLIT_SEEDS = {"train": 1, "validation": 5_000_000, "test": 10_000_000}


def builtin_examples(split: str, per_task: int, tasks: list[str] | None = None) -> list[Example]:
    """`per_task` examples of each built-in task; the same call always returns the same examples.

    Train, validation and test come from different seeds; validation and test skip questions that also
    occur in train (and validation those in test), so the splits are fixed and disjoint. Validation is
    for choices made before the test set is looked at (e.g. a loss weight).
    """
    import reasoning_gym  # ~1 s to import: only when built-in data is asked for

    if split not in _SPLIT_SEEDS:
        raise ValueError(f"split={split!r} is invalid: expected 'train', 'validation' or 'test'")
    names = tasks or list(BUILTIN_TASKS)
    unknown = [name for name in names if name not in BUILTIN_TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown built-in tasks {unknown}; valid: {', '.join(BUILTIN_TASKS)}")
    examples = []
    for name in names:
        generator, settings = BUILTIN_TASKS[name]
        seen = set()
        held_out = {"test": ["train"], "validation": ["train", "test"]}.get(split, [])
        for other in held_out:
            pool = reasoning_gym.create_dataset(
                generator, size=4 * per_task, seed=_SPLIT_SEEDS[other], **settings
            )
            seen |= {item["question"] for item in pool}
        pool = reasoning_gym.create_dataset(
            generator, size=4 * per_task, seed=_SPLIT_SEEDS[split], **settings
        )
        chosen = [item for item in pool if item["question"] not in seen][:per_task]
        examples += [Example(name, item["question"], "", item["answer"], item["answer"]) for item in chosen]
    return examples
