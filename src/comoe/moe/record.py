"""LayerRecord: what one forward of a routed layer leaves behind for the objectives and for analysis."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comoe.moe.routing import Routing


@dataclass
class LayerRecord:
    """The routing and expert down-projections of one layer call, kept only while the model asks for them
    (auxiliary losses, `record_routing()`), and dropped after the forward so nothing outlives a step."""

    routing: Routing
    z: torch.Tensor  # [T, n, r] down-projections of all experts, of the (dropped-out) input they saw
    mask: torch.Tensor | None  # [T] bool, True for real (non-padding) tokens
    lora_B: torch.Tensor  # [n, r, d_out] the experts' up-projections (the parameter itself)
    gram: torch.Tensor | None = None  # [n*r, n*r] B B^T, taken in the forward where B is whole under FSDP
    # |W0 x| per token ([T], or the call's [B, L]; float32 at least, no gradient): times floor_scale, the
    # per-token floor of |B_i z_i| in the contrastive cosines (`norm_floor`); the scaling is left to the
    # objectives, so a group of layers is scaled in one op (objectives.registry.stacked_norm_floors)
    base_norm: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [T, n] the router's logits, when an objective needs "logits"
    # [T, n, d_out] every expert's output on every token, from a bank whose outputs are not s B_i^T z_i (DoRA
    # experts: ExpertBank.outputs_are_lora False), when an objective needs the experts' cosines ("gram") or a
    # record is kept outside training; the Gram path does not hold for them, so `gram` is None and
    # `norm_floor` is in output space (contrastive_norm_floor * |W0 x|)
    outputs: torch.Tensor | None = None
    # [B] int64 each sequence's task id (into config.tasks, -1 outside it) of a call that carried task_ids,
    # attached by the model (like the mask) when an objective needs "task_ids"; the layer's T tokens are the
    # B sequences' rows, each of T // B tokens
    task_ids: torch.Tensor | None = None
    # contrastive_norm_floor / scaling on the Gram path (z-space), contrastive_norm_floor for materialised
    # outputs (output space)
    floor_scale: float = 1.0

    @property
    def norm_floor(self) -> torch.Tensor | None:
        """[T] the per-token floor of the experts' output norms in the contrastive cosines: base_norm *
        floor_scale (contrastive_norm_floor * |W0 x|, / scaling in z-space), or None without a floor."""
        return None if self.base_norm is None else self.base_norm.reshape(-1) * self.floor_scale


def token_columns(mask: torch.Tensor, num_tokens: int) -> torch.Tensor | None:
    """The columns of a call's [B, C] token mask that a layer's T = num_tokens flattened tokens are: the
    last L = T / B columns ([B, L]; under a KV cache the call's tokens are the mask's last ones), or None
    when the T tokens cannot be the mask's rows (T not a multiple of B, or L > C)."""
    rows, columns = mask.shape
    length = num_tokens // rows if rows else 0
    if rows == 0 or length * rows != num_tokens or length > columns:
        return None
    return mask[:, columns - length :]
