"""The language-model head applied only where a loss or a score needs it, on any wrapped causal LM."""

from __future__ import annotations

import torch

from comoe.data.collate import IGNORE_INDEX


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (itself otherwise)."""
    return getattr(model, "module", model)


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own logits (float32) for final hidden states: the output embedding, then the logit
    soft-capping that some families apply (Gemma 2: tanh(x / c) * c), as their forward does."""
    inner = unwrap_model(model)
    logits = inner.get_output_embeddings()(hidden).float()
    config = getattr(inner, "config", None)
    cap = getattr(getattr(config, "text_config", None) or config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def response_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-head logits at the positions that predict a labelled token, and those tokens: ([N, V], [N]).

    The model computes logits for one position only; its final hidden states at labelled positions go
    through the head, which skips the head's FLOPs (about 20% of SmolLM2's) on prompts and padding.
    """
    # the per-call inputs an adapter reads (task_ids for task-routed methods; none for the others)
    names = getattr(unwrap_model(model), "call_input_names", ())
    inputs = {name: batch[name] for name in names if name in batch}
    if getattr(unwrap_model(model), "reads_prompt", False):  # prompt-aware routing pools the prompt alone
        inputs["prompt_mask"] = batch["labels"] == IGNORE_INDEX
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=1,
        output_hidden_states=True,
        **inputs,
    )
    targets = batch["labels"][:, 1:]
    labelled = targets != IGNORE_INDEX
    return head_logits(model, out.hidden_states[-1][:, :-1][labelled]), targets[labelled]
