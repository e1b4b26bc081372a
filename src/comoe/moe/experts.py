"""Expert compute: sum_{i active} gate_i * scaling * B_i A_i x for every token, without a loop over tokens.

Every expert's down-projection z_i = A_i x is computed for all experts in one matmul ([T, n*r]; the
contrastive objectives need all of them anyway). The up-projection then has two exact strategies:

- blocks: scale z by the dense gate matrix (zero for inactive experts) and multiply by all B_i stacked,
  one [T, n*r] x [n*r, d_out] matmul. More FLOPs than needed (n/k times), but no gathers: on CPU with
  small r it beats sparse kernels, whose r-wide GEMMs are inefficient.
- grouped: sort (token, expert) pairs by expert, gather their r-wide z rows, one grouped matmul
  (comoe.moe.kernels, the kernel boundary), scatter-add back to tokens. FLOPs proportional to k, not n.

Every strategy has the same signature and is registered in STRATEGIES; `mix()` is the one entry point the
layer calls, so a new strategy is one function and one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from comoe.moe.kernels import grouped_matmul
from comoe.moe.routing import Routing, sort_by_expert

# On CPU, with n/k at most this, the dense blocks matmul is cheaper than gather + grouped matmul + scatter.
# On a GPU blocks won at every measured shape up to n = 16 (H100, bf16, docs/performance.md): the GEMMs
# are too small to be compute-bound, and the sort/gather/scatter kernels cost more than the saved FLOPs.
BLOCKS_MAX_EXPERT_RATIO = 4


def down_project(x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """z[t, i] = A_i x_t for all experts: [T, d_in] x [n, r, d_in] -> [T, n, r]."""
    n, r, d_in = lora_A.shape
    return (x @ lora_A.reshape(n * r, d_in).t()).view(-1, n, r)


def expert_gram(lora_B: torch.Tensor) -> torch.Tensor:
    """All Gram blocks B_i B_j^T as one [n*r, n*r] matrix (B stored [n, r, d_out]), in float32."""
    n, r, d_out = lora_B.shape
    flat = lora_B.float().reshape(n * r, d_out)
    return flat @ flat.t()


def mix_blocks(z: torch.Tensor, routing: Routing, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Gate-weighted sum of B_i z_i over active experts as one dense matmul over all experts."""
    n, r, d_out = lora_B.shape
    weighted = z * (routing.dense_gates() * scaling).to(z.dtype).unsqueeze(-1)
    return weighted.reshape(-1, n * r) @ lora_B.reshape(n * r, d_out)


def mix_grouped(z: torch.Tensor, routing: Routing, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Gate-weighted sum of B_i z_i over active experts, computing only the active pairs."""
    n, r, d_out = lora_B.shape
    pairs = sort_by_expert(routing.indices, n)
    gates = routing.gates.reshape(-1)[pairs.order] * scaling
    z_pairs = z[pairs.tokens, pairs.experts] * gates.to(z.dtype).unsqueeze(-1)
    out_pairs = grouped_matmul(z_pairs, lora_B, pairs.counts, pairs.offsets)
    return z.new_zeros(z.shape[0], d_out).index_add(0, pairs.tokens, out_pairs)


MixStrategy = Callable[[torch.Tensor, Routing, torch.Tensor, float], torch.Tensor]
STRATEGIES: dict[str, MixStrategy] = {"blocks": mix_blocks, "grouped": mix_grouped}


def choose_strategy(strategy: str, num_experts: int, active: int, device_type: str = "cpu") -> str:
    """'auto' resolved: on CPU blocks while n/k <= BLOCKS_MAX_EXPERT_RATIO, grouped beyond; on CUDA
    blocks."""
    if strategy != "auto":
        return strategy
    if device_type == "cuda":
        return "blocks"
    return "blocks" if num_experts / active <= BLOCKS_MAX_EXPERT_RATIO else "grouped"


def mix(
    z: torch.Tensor, routing: Routing, lora_B: torch.Tensor, scaling: float, strategy: str = "auto"
) -> torch.Tensor:
    """sum over active experts of gate * scaling * B_i z_i per token ([T, n, r] -> [T, d_out])."""
    name = choose_strategy(strategy, lora_B.shape[0], routing.indices.shape[1], z.device.type)
    return STRATEGIES[name](z, routing, lora_B, scaling)
