"""Multi-process training on PyTorch's own engine: torchrun / accelerate launch set the environment,
this module joins the process group and gives the trainer the few collective operations it needs. With one
process every operation is a no-op, so the training code reads the same either way."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> World:
        """Join the process group that torchrun or accelerate describe in WORLD_SIZE / RANK (gloo on CPU)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        if not dist.is_initialized():
            if torch.cuda.is_available():  # one GPU per process, the one --device auto picks
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return cls(rank=dist.get_rank(), size=dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (a copy; no gradient)."""
        values = values.detach().clone()
        if self.size > 1:
            if dist.get_backend() == "nccl" and values.device.type != "cuda":  # NCCL reduces GPU tensors only
                on_gpu = values.to(f"cuda:{torch.cuda.current_device()}")
                dist.all_reduce(on_gpu)
                return on_gpu.to(values.device)
            dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, fsdp: bool = False) -> torch.nn.Module:
        """The module to call forward on: the model under DistributedDataParallel (gradients averaged over
        processes), or, with fsdp, the model itself after FSDP2 has sharded its base (see shard)."""
        if self.size == 1:
            return model
        if fsdp:
            shard(getattr(model, "wrapped_model", model))
            return model
        return DistributedDataParallel(model)

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def shard(base: torch.nn.Module) -> None:
    """FSDP2 (fully_shard): each transformer block, then the rest of the base model.

    The blocks are the children of the model's longest nn.ModuleList. Frozen base weights and trainable
    experts are sharded alike; gradients are reduce-scattered (averaged), as DDP would average them.
    """
    blocks = max((m for m in base.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=[])
    for block in blocks:
        fully_shard(block)
    fully_shard(base)


SINGLE = World()  # one process: every collective is a no-op
