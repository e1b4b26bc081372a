"""The order examples are trained in: seeded per epoch, split across processes, resumable mid-epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from comoe.data.collate import Tokenized, pad_batch
from comoe.training.distributed import World
from comoe.training.settings import TrainArgs


def micro_batches(
    items: list[Tokenized], task_ids: list[int], args: TrainArgs, pad_id: int, start_micro: int, world: World
) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches in a seeded order per epoch, from micro-batch `start_micro` on (for resume).

    The order depends on the seed and the epoch only; each global micro-batch of batch_size * world.size
    examples is split into contiguous per-process slices, so N processes see what one process would.
    """
    global_size = args.batch_size * world.size
    per_epoch = math.ceil(len(items) / global_size)
    micro = start_micro
    while True:
        epoch, offset = divmod(micro, per_epoch)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        chunk = order[offset * global_size : (offset + 1) * global_size].tolist()
        mine = chunk[world.rank * args.batch_size : (world.rank + 1) * args.batch_size] or chunk[-1:]
        batch = pad_batch([items[i] for i in mine], pad_id)
        batch["task_ids"] = torch.tensor([task_ids[i] for i in mine])
        yield batch
        micro += 1
