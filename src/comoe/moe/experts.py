"""Expert compute: sum_{i active} gate_i * scaling * B_i A_i x for every token, without a loop over tokens.

Every expert's down-projection z_i = A_i x is computed for all experts in one matmul ([T, n*r]; the
contrastive objectives need all of them anyway). The up-projection then has two exact strategies:

- blocks: scale z by the dense gate matrix (zero for inactive experts) and multiply by all B_i stacked,
  one [T, n*r] x [n*r, d_out] matmul. More FLOPs than needed (n/k times), but no gathers: on CPU with
  small r it beats sparse kernels, whose r-wide GEMMs are inefficient.
- grouped: sort (token, expert) pairs by expert, gather their r-wide z rows, one grouped matmul
  (comoe.moe.kernels, the kernel boundary), scatter-add back to tokens. FLOPs proportional to k, not n.

The strategy boundary is `mix(z, routing, B, scaling)`: everything from the routing decision to the
per-token output (gather, GEMMs, gating, scatter) is inside one strategy, so a fused kernel for a device
(ScatterMoE's gather+GEMM+scatter) is one more strategy. Strategies are registered in STRATEGIES with a
preference per device and shape; `expert_compute='auto'` takes the registered strategy that prefers the
shape most on the tensors' device (see choose_strategy). A new strategy is one `register_strategy` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from comoe.errors import PLUGIN_HINT, UnregisteredName
from comoe.moe.kernels import grouped_matmul
from comoe.moe.routing import Routing, sort_by_expert
from comoe.plugins import discover_once

# On CPU, with n/k at most this, the dense blocks matmul is cheaper than gather + grouped matmul + scatter.
# On a GPU blocks won at every measured shape up to n = 16 (H100, bf16, docs/performance.md): the GEMMs
# are too small to be compute-bound, and the sort/gather/scatter kernels cost more than the saved FLOPs.
BLOCKS_MAX_EXPERT_RATIO = 4


def expert_gram(lora_B: torch.Tensor) -> torch.Tensor:
    """All Gram blocks B_i B_j^T as one [n*r, n*r] matrix (B stored [n, r, d_out]), in float32."""
    n, r, d_out = lora_B.shape
    flat = lora_B.float().reshape(n * r, d_out)
    return flat @ flat.t()


def gram_in_forward() -> bool:
    """Whether layers take their experts' Gram matrix in the forward: with several processes, where FSDP
    reshards B after the forward. In one process the record's B is the parameter itself, and the
    contrastive objectives compute the Grams of a group of layers in one batched matmul (fewer ops)."""
    return dist.is_available() and dist.is_initialized()


def expert_grams(lora_B: torch.Tensor) -> torch.Tensor:
    """expert_gram of stacked up-projections [..., n, r, d_out] -> [..., n*r, n*r], in float32 (one bmm
    over the leading dimensions: fewer dispatched ops than a broadcasting matmul)."""
    n, r, d_out = lora_B.shape[-3:]
    flat = lora_B.float().reshape(-1, n * r, d_out)
    return torch.bmm(flat, flat.transpose(1, 2)).view(*lora_B.shape[:-3], n * r, n * r)


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


MixFunction = Callable[[torch.Tensor, Routing, torch.Tensor, float], torch.Tensor]
# (device type, number of experts, active experts per token) -> how much this strategy suits the shape
# there: the highest positive score wins under 'auto'; 0 or less: never chosen by 'auto' on that device.
Preference = Callable[[str, int, int], float]


@dataclass(frozen=True)
class MixStrategy:
    """A way to compute `sum_{i active} gate_i * scaling * B_i z_i` per token.

    `mix(z [T, n, r], routing, lora_B [n, r, d_out], scaling) -> [T, d_out]`, exact (tested against the
    dense reference in tests/moe/test_experts.py); `preference` says where `auto` should pick it.
    """

    name: str
    mix: MixFunction
    preference: Preference


def _blocks_preference(device_type: str, num_experts: int, active: int) -> float:
    # On a GPU blocks won at every measured shape up to n = 16 (H100, bf16, docs/performance.md).
    if device_type == "cuda":
        return 2.0
    return 2.0 if num_experts / active <= BLOCKS_MAX_EXPERT_RATIO else 1.0


def _grouped_preference(device_type: str, num_experts: int, active: int) -> float:
    if device_type == "cuda":
        return 1.0
    return 1.5 if num_experts / active > BLOCKS_MAX_EXPERT_RATIO else 0.5


STRATEGIES: dict[str, MixStrategy] = {}


def register_strategy(strategy: MixStrategy) -> MixStrategy:
    """Add (or replace) an expert compute strategy under its name; returns it."""
    if strategy.name == "auto":
        raise ValueError("'auto' names the choice among strategies, not a strategy")
    STRATEGIES[strategy.name] = strategy
    return strategy


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy (tests register toy ones)."""
    STRATEGIES.pop(name, None)


register_strategy(MixStrategy("blocks", mix_blocks, _blocks_preference))
register_strategy(MixStrategy("grouped", mix_grouped, _grouped_preference))


def choose_strategy(strategy: str, num_experts: int, active: int, device_type: str = "cpu") -> str:
    """The strategy to run: `strategy` itself if registered (ValueError listing them if not), or for
    'auto' the registered strategy with the highest preference for this device and shape (ties: the first
    registered). On CPU that is blocks while n/k <= BLOCKS_MAX_EXPERT_RATIO and grouped beyond; on CUDA
    blocks."""
    if strategy != "auto":
        if strategy not in STRATEGIES:
            discover_once()
        if strategy not in STRATEGIES:
            names = ", ".join(["auto", *STRATEGIES])
            raise UnregisteredName(
                f"expert_compute={strategy!r} is not a registered strategy; valid: {names} ({PLUGIN_HINT})"
            )
        return strategy
    scores = {name: s.preference(device_type, num_experts, active) for name, s in STRATEGIES.items()}
    best = max(scores, key=scores.__getitem__)
    if scores[best] <= 0:
        raise ValueError(f"expert_compute='auto': no registered strategy runs on {device_type!r}")
    return best


def mix(
    z: torch.Tensor, routing: Routing, lora_B: torch.Tensor, scaling: float, strategy: str = "auto"
) -> torch.Tensor:
    """sum over active experts of gate * scaling * B_i z_i per token ([T, n, r] -> [T, d_out])."""
    name = choose_strategy(strategy, lora_B.shape[0], routing.indices.shape[1], z.device.type)
    return STRATEGIES[name].mix(z, routing, lora_B, scaling)
