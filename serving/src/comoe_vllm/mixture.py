"""The routed mixture of LoRA experts of one serving linear layer, in plain torch (no vLLM).

A vLLM linear may pack several Hugging Face linears (q/k/v in one QKV projection, gate/up in one merged
projection) and may hold only a shard of each under tensor parallelism. `PackedMixture` computes, for the
slices that the adapter targets, each slice's own routed mixture (comoe.adapter.layer.ComoeLinear's):

    delta_s(x) = sum_{i in topk(p)} g_i * (lora_alpha / r) * B_i^T A_i x,   p = softmax(W_g x) (float32)

with two matmuls for all slices together: one shrink ([routers; A rows] of every slice, stacked, against
x) and one expand (the gated down-projections against the slices' B rows, each placed at its slice's output
columns, zeros elsewhere). A comoe layer is thus one LoRA of rank sum_s n_s * r with a per-token gate
between shrink and expand.

Tensor parallelism: a column-parallel layer keeps only its output shard's columns of B; a row-parallel
layer holds a shard of the input, so it keeps its input shard's columns of the routers and A, and the
shrink's partial sums are all-reduced (n + n * r numbers per token and slice) before routing; every rank
then adds the same delta to the all-reduced output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from comoe_vllm.adapter import Experts, Routing


def dense_gates(logits: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[T, n] gate per (token, expert), zero for inactive experts: softmax in float32, then every expert
    (soft) or the top-k, renormalised over the chosen ones when routing.normalize (comoe.moe.routing.route
    and Routing.dense_gates)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if routing.soft:
        return probs
    top, indices = probs.topk(routing.top_k, dim=-1)
    if routing.normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(1, indices, top)


@dataclass(frozen=True)
class Slice:
    """One Hugging Face linear inside a serving layer: its experts, the columns of its output (and, row
    parallel, of its input) kept on this rank, and where its output columns sit in the layer's output."""

    experts: Experts
    out_columns: slice  # of the HF linear's d_out, kept on this rank
    out_offset: int  # first column of the slice in the serving layer's local output
    in_columns: slice = field(
        default_factory=lambda: slice(None)
    )  # of d_in, kept on this rank (row parallel); all by default


class PackedMixture(nn.Module):
    """The experts of every adapted slice of one serving linear: x [..., d_in_local] -> delta [T, d_out_local]
    (the experts' dtype; the caller casts). `all_reduce` sums the shrink over tensor-parallel ranks (row
    parallel layers), None otherwise."""

    def __init__(
        self,
        slices: list[Slice],
        out_features: int,
        routing: Routing,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.routing = routing
        self.all_reduce = all_reduce
        rows, layout, offset = [], [], 0
        for part in slices:
            e = part.experts
            n, r = e.lora_A.shape[:2]
            rows += [e.router[:, part.in_columns], e.lora_A.reshape(n * r, -1)[:, part.in_columns]]
            layout.append((offset, n, r))
            offset += n + n * r
        self.layout = tuple(layout)
        shrink = torch.cat(rows).contiguous()
        rank_total = sum(n * r for _, n, r in layout)
        expand = torch.zeros(rank_total, out_features, dtype=shrink.dtype)
        row = 0
        for part, (_, n, r) in zip(slices, layout, strict=True):
            block = part.experts.lora_B.reshape(n * r, -1)[:, part.out_columns]
            expand[row : row + n * r, part.out_offset : part.out_offset + block.shape[1]] = block
            row += n * r
        self.register_buffer("shrink", shrink.to(device), persistent=False)
        self.register_buffer("expand", expand.to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.shrink.dtype)
        shrunk = flat @ self.shrink.t()
        if self.all_reduce is not None:
            shrunk = self.all_reduce(shrunk)
        scaling = self.routing.scaling
        if len({(n, r) for _, n, r in self.layout}) == 1:  # every slice alike: route them in one go
            _, n, r = self.layout[0]
            parts = shrunk.view(-1, len(self.layout), n + n * r)
            gates = dense_gates(parts[..., :n].reshape(-1, n), self.routing) * scaling
            z = parts[..., n:].reshape(-1, n, r)
            gated = (z * gates.to(z.dtype).unsqueeze(-1)).reshape(shrunk.shape[0], -1)
            return gated @ self.expand
        pieces = []
        for offset, n, r in self.layout:
            gates = dense_gates(shrunk[:, offset : offset + n], self.routing) * scaling
            z = shrunk[:, offset + n : offset + n + n * r].reshape(-1, n, r)
            pieces.append((z * gates.to(z.dtype).unsqueeze(-1)).reshape(-1, n * r))
        return torch.cat(pieces, dim=-1) @ self.expand
