"""Expert specialisation as numbers: routing statistics, mutual information between task and expert, and
redundancy between experts (cosine similarity of their outputs on the same tokens, from Gram matrices).

Training imports this module for the statistics it logs, so it holds numbers only: no plotting, no files.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from comoe.adapter.layer import ComoeLinear
from comoe.moe.experts import expert_gram
from comoe.moe.record import LayerRecord
from comoe.objectives.cosine import output_anchor_cosines
from comoe.objectives.gram import anchor_cosines

LN2 = math.log(2.0)


def entropy_bits(counts: torch.Tensor) -> float:
    """Plug-in entropy (bits) of the distribution given by non-negative counts."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0].double() / total
    return float(-(p * p.log2()).sum())


def mutual_information(
    task_ids: torch.Tensor, expert_ids: torch.Tensor, bias_correction: bool = True
) -> float:
    """I(task; expert) in bits from paired samples, plug-in estimate with the Miller-Madow correction.

    The plug-in estimate is biased upwards by about (m_T - 1)(m_E - 1) / (2 N ln 2) for independent
    variables; Miller-Madow adds (m - 1) / (2 N ln 2) to each entropy (m: occupied bins), which removes
    that bias to first order. Clamped at 0.
    """
    task_ids, expert_ids = task_ids.reshape(-1).long(), expert_ids.reshape(-1).long()
    if task_ids.numel() != expert_ids.numel():
        raise ValueError(f"task_ids and expert_ids must pair up: {task_ids.numel()} vs {expert_ids.numel()}")
    if task_ids.numel() == 0:
        return 0.0
    num_tasks, num_experts = int(task_ids.max()) + 1, int(expert_ids.max()) + 1
    joint = torch.bincount(task_ids * num_experts + expert_ids, minlength=num_tasks * num_experts)
    return mutual_information_from_counts(joint.view(num_tasks, num_experts).double(), bias_correction)


def mutual_information_from_counts(joint: torch.Tensor, bias_correction: bool = True) -> float:
    """I(row; column) in bits from a contingency table of counts (see mutual_information)."""
    n = float(joint.sum())
    if n == 0:
        return 0.0
    rows, cols = joint.sum(1), joint.sum(0)
    mi = entropy_bits(rows) + entropy_bits(cols) - entropy_bits(joint.flatten())
    if bias_correction:
        occupied = int((rows > 0).sum()) + int((cols > 0).sum()) - int((joint > 0).sum()) - 1
        mi += occupied / (2 * n * LN2)
    return max(0.0, mi)


def load_stats(counts: torch.Tensor, k: int, mass: torch.Tensor | None = None) -> dict[str, Any]:
    """From routed (token, slot) counts per expert: load, its entropy and imbalance, dead/collapsed flags;
    with `mass` (the router's probability mass per expert, summed over tokens) also its share.

    Dead: an expert with under a tenth of the uniform load (it receives almost no tokens).
    Collapsed: k experts take over 90% of the load, or one expert over 90% of the mass. For dense (soft)
    routing, where every expert takes every token, pass the mass as `counts` and k = 1.
    """
    counts = counts.double()
    n = counts.numel()
    load = counts / counts.sum().clamp_min(1e-12)
    share = None if mass is None else mass.double() / mass.double().sum().clamp_min(1e-12)
    dead = [i for i in range(n) if load[i] < 0.1 / n]
    collapsed = n > k and load.sort(descending=True).values[:k].sum() > 0.9
    collapsed = collapsed or (share is not None and n > 1 and share.max() > 0.9)
    stats = {
        "load": load.tolist(),
        "load_entropy_bits": entropy_bits(counts),
        "max_load_entropy_bits": math.log2(n),
        "load_cv": float(load.std(unbiased=False) / load.mean()) if n > 1 else 0.0,
        "dead_experts": dead,
        "collapsed": bool(collapsed),
    }
    if share is not None:
        stats["mass"] = share.tolist()
    return stats


def mean_routing_entropy_bits(probs: torch.Tensor) -> float:
    """Mean over tokens of the entropy of the router's distribution (bits): low means confident routing."""
    probs = probs.double()
    return float(-(probs * probs.clamp_min(1e-30).log2()).sum(1).mean()) if len(probs) else 0.0


def routing_stats(
    indices: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, Any]:
    """Routing statistics of one layer over real tokens: `indices` [T, k] active experts, `probs` [T, n]."""
    if mask is not None:
        indices, probs = indices[mask], probs[mask]
    mass = probs.double().sum(0)
    dense = indices.shape[1] == probs.shape[1]  # soft routing: the load is the probability mass
    counts = mass if dense else torch.bincount(indices.reshape(-1), minlength=probs.shape[1])
    return {
        "tokens": int(indices.shape[0]),
        **load_stats(counts, 1 if dense else indices.shape[1], mass),
        "routing_entropy_bits": mean_routing_entropy_bits(probs),
    }


def expert_similarity(
    z: torch.Tensor,
    lora_B: torch.Tensor,
    mask: torch.Tensor | None = None,
    outputs: torch.Tensor | None = None,
) -> float:
    """Mean cosine similarity between the outputs of every pair of experts on the same tokens.

    From the Gram matrix of the experts' B (exact, no [T, n, d_out] outputs): 1 means redundant experts.
    `outputs` [T, n, d_out]: the experts' materialised outputs (a record's, from a bank whose outputs are
    not s B^T z, e.g. DoRA experts), whose plain cosines are taken instead.
    """
    if mask is not None:
        z = z[mask]
        outputs = None if outputs is None else outputs[mask]
    n = z.shape[1]
    if n < 2 or z.shape[0] == 0:
        return 0.0
    everyone = torch.arange(n, device=z.device).expand(z.shape[0], n)
    if outputs is not None:
        cosines = output_anchor_cosines(outputs, everyone)  # [T, n, n]
    else:
        cosines = anchor_cosines(z, everyone, expert_gram(lora_B))  # [T, n, n]
    pairs = torch.triu_indices(n, n, offset=1)
    return float(cosines[:, pairs[0], pairs[1]].mean())


def _holders(layer: ComoeLinear) -> int:
    """How many experts may hold a layer's load without it counting as collapsed: top_k, or 1 for dense
    routing (whose load is probability mass)."""
    return 1 if layer.active_experts == layer.num_experts else layer.top_k


TOKEN_BUCKETS = 64  # token identity is bucketed as id mod 64 for I(token; expert)


def _count_pairs(
    table: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor | None = None
) -> None:
    """Add every (row label, routed expert) pair of [T] labels and [T, k] expert indices to a count table
    (each pair weighted by `weights` [T, k] when given: the probability mass of dense routing)."""
    n = table.shape[1]
    flat = rows.repeat_interleave(indices.shape[1]) * n + indices.reshape(-1)
    flat_weights = None if weights is None else weights.reshape(-1).double()
    counts = torch.bincount(flat, weights=flat_weights, minlength=table.numel())
    table += counts.view_as(table).to(table.device, table.dtype)


class SpecialisationAccumulator:
    """Per-layer task x expert counts, routing statistics and expert similarity over many batches."""

    def __init__(
        self, layers: dict[str, ComoeLinear], task_names: list[str], similarity: bool = True
    ) -> None:
        self.layers = layers
        self.similarity = similarity
        self.task_names = task_names
        n_tasks = len(task_names)
        self.joint = {
            name: torch.zeros(n_tasks, layer.num_experts, dtype=torch.float64)
            for name, layer in layers.items()
        }
        self.token_joint = {
            name: torch.zeros(TOKEN_BUCKETS, layer.num_experts, dtype=torch.float64)
            for name, layer in layers.items()
        }
        self.entropy_sum = dict.fromkeys(layers, 0.0)
        self.similarity_sum = dict.fromkeys(layers, 0.0)
        self.tokens = dict.fromkeys(layers, 0)
        self.mass = {n: torch.zeros(layer.num_experts, dtype=torch.float64) for n, layer in layers.items()}

    @torch.no_grad()
    def update(
        self,
        records: dict[str, LayerRecord],
        token_tasks: torch.Tensor,
        token_ids: torch.Tensor | None = None,
    ) -> None:
        """Add one forward's routing; `token_tasks` [T] holds each token's task index (-1 for padding) and
        `token_ids` [T], when given, the input token ids (for I(token bucket; expert))."""
        for name, record in records.items():
            mask = token_tasks >= 0 if record.mask is None else record.mask & (token_tasks >= 0)
            indices = record.routing.indices[mask]
            probs = record.routing.probs[mask]
            # dense routing: every expert takes every token, so the table counts probability mass; a routing
            # that marks its active experts (AdaMoLE's threshold, Routing.active) counts its active pairs
            weights = probs if indices.shape[1] == probs.shape[1] else None
            if record.routing.active is not None:
                weights = record.routing.active[mask].double()
            _count_pairs(self.joint[name], token_tasks[mask], indices, weights)
            if token_ids is not None:
                buckets = token_ids.reshape(-1)[mask] % TOKEN_BUCKETS
                _count_pairs(self.token_joint[name], buckets, indices, weights)
            self.mass[name] += probs.double().sum(0).to(self.mass[name].device)
            count = int(mask.sum())
            self.entropy_sum[name] += mean_routing_entropy_bits(record.routing.probs[mask]) * count
            if self.similarity:
                similarity = expert_similarity(record.z, record.lora_B, mask, record.outputs)
                self.similarity_sum[name] += similarity * count
            self.tokens[name] += count

    def summary(self) -> dict[str, Any]:
        layers = {}
        for name, joint in self.joint.items():
            tokens = max(1, self.tokens[name])
            task_entropy = entropy_bits(joint.sum(1))
            mi = mutual_information_from_counts(joint)
            layers[name] = {
                "tokens": self.tokens[name],
                **load_stats(joint.sum(0), _holders(self.layers[name]), self.mass[name]),
                "routing_entropy_bits": self.entropy_sum[name] / tokens,
                "mi_task_expert_bits": mi,
                "nmi_task_expert": mi / task_entropy if task_entropy > 0 else 0.0,
                "expert_similarity": self.similarity_sum[name] / tokens,
                "mi_token_expert_bits": mutual_information_from_counts(self.token_joint[name]),
                "task_expert_load": (joint / joint.sum(1, keepdim=True).clamp_min(1)).tolist(),
            }
        values = list(layers.values())

        def mean(key: str) -> float:
            return sum(v[key] for v in values) / max(1, len(values))

        return {
            "tasks": self.task_names,
            "layers": layers,
            "mean_mi_task_expert_bits": mean("mi_task_expert_bits"),
            "mean_nmi_task_expert": mean("nmi_task_expert"),
            "mean_mi_token_expert_bits": mean("mi_token_expert_bits"),
            "mean_expert_similarity": mean("expert_similarity"),
            "mean_load_cv": mean("load_cv"),
        }


def token_tasks(task_rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B*S] task index of every token, -1 on padding, from each row's task index [B]."""
    return torch.where(attention_mask.bool(), task_rows.unsqueeze(1), -1).reshape(-1)
