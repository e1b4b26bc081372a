"""LoRAMoE's localized balancing constraint (Dou et al., ACL 2024, arXiv 2312.09979, section 3.2): the fast
path of the `loramoe` objective, and its registration.

The experts of a layer are split into two groups tied to two types of example: experts 0 .. n//2-1 to
downstream tasks, n//2 .. n-1 to world knowledge (the tasks named in `knowledge_tasks`; every other task is
of the downstream type). Q[b, i], the importance of expert i on example b, is the sum of its gates over the
example's real tokens; it is weighted by 1 + delta where expert i's group is example b's type and 1 - delta
otherwise (Z = I * Q), and the loss is the squared coefficient of variation of all B * n entries,

    L = Var(Z) / (mean(Z)^2 + 1e-10)      (unbiased variance, as torch.var and the released code)

so balance is asked within each group and the type's own group is favoured. The released code
(github.com/Ablustrund/LoRAMoE, peft/tuners/lora.py, `cv_squared` and `forward`) computes it per adapted
linear from the softmax gates summed over each sequence, and adds beta * L of every linear to the loss;
here the objective's weight is beta and, as for every objective, the layers' losses are averaged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from comoe.config import ComoeConfig
from comoe.moe.record import LayerRecord
from comoe.objectives.infonce import valid_mask
from comoe.objectives.registry import Objective, register_objective

CV_EPS = 1e-10  # the released code's epsilon in cv_squared


def type_coefficients(
    knowledge: Tensor, num_experts: int, delta: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """I [B, n]: 1 + delta where expert i's group (knowledge for i >= n // 2) is example b's type
    (`knowledge` [B] bool), 1 - delta otherwise."""
    expert_knowledge = torch.arange(num_experts, device=knowledge.device) >= num_experts // 2
    match = knowledge[:, None] == expert_knowledge[None, :]
    own = torch.tensor(1.0 + delta, dtype=dtype, device=knowledge.device)
    return torch.where(match, own, torch.tensor(1.0 - delta, dtype=dtype, device=knowledge.device))


def localized_balance_loss(
    router_probs: Tensor, knowledge: Tensor, mask: Tensor | None = None, delta: float = 0.1
) -> Tensor:
    """CV^2 of the type-weighted importances Z = I * Q [B, n] (see the module's docstring).

    Shapes: ``router_probs`` [T, n] the dense gates of T = B * S tokens (B sequences of S tokens each, in
    order), ``knowledge`` [B] bool (or [1] for every sequence) whether each sequence is of the
    world-knowledge type, ``mask`` [T] bool real tokens (padding adds no importance); returns a scalar in
    float32 at least. ValueError when T is not a multiple of B. Tested against
    ``comoe.objectives.reference.localized_balance_loss``.
    """
    if router_probs.dim() != 2:
        raise ValueError(f"router_probs must have shape (T, n), got {tuple(router_probs.shape)}")
    num_tokens, num_experts = router_probs.shape
    probs = router_probs.float() if router_probs.dtype in (torch.float16, torch.bfloat16) else router_probs
    rows = knowledge.shape[0]  # one id for the whole call: its tokens pooled as one example
    if rows == 0 or num_tokens % rows:
        raise ValueError(f"{num_tokens} tokens are not whole sequences of the {rows} examples' task ids")
    weights = valid_mask(mask, num_tokens, probs.device).to(probs.dtype)
    importance = (probs * weights[:, None]).reshape(rows, -1, num_experts).sum(1)  # Q [B, n]
    coefficients = type_coefficients(knowledge.to(probs.device), num_experts, delta, probs.dtype)
    weighted = (importance * coefficients).reshape(-1)
    if weighted.numel() < 2:
        return weighted.sum() * 0.0
    return weighted.var() / (weighted.mean().square() + CV_EPS)


def knowledge_flags(config: ComoeConfig, task_ids: Tensor) -> Tensor:
    """[B] bool: whether each task id (into config.tasks; -1 a task outside them) names one of
    config.knowledge_tasks. ValueError when config.tasks is None."""
    if not config.tasks:
        raise ValueError(
            "tasks: null; the loramoe objective maps each example's task to its type through the adapter's "
            "task vocabulary (comoe train records it; from Python set ComoeConfig(tasks=[...]))"
        )
    known = set(config.knowledge_tasks)
    flags = torch.tensor([name in known for name in config.tasks] + [False], device=task_ids.device)
    return flags[task_ids]  # -1 indexes the last entry: a task outside the vocabulary is downstream


def loramoe_objective(record: LayerRecord, config: ComoeConfig) -> Tensor:
    """One layer's localized balancing constraint over its real tokens (record.task_ids: the call's)."""
    if record.task_ids is None:
        raise ValueError("loramoe needs each sequence's task id: the call carried no task_ids")
    knowledge = knowledge_flags(config, record.task_ids)
    delta = config.localized_balance_delta
    return localized_balance_loss(record.routing.probs, knowledge, record.mask, delta)


LORAMOE = register_objective(
    Objective(
        "loramoe",
        loramoe_objective,
        component="localized_balance",
        needs=frozenset({"task_ids"}),
        description="LoRAMoE's localized balancing constraint: CV^2 of type-weighted expert importances "
        "(weight beta; delta: localized_balance_delta; types: knowledge_tasks)",
    )
)
