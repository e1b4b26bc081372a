"""Auxiliary objectives: plain reference definitions, the exact Gram-matrix fast path, and their registry."""

from comoe.objectives.auxiliary import CONTRASTIVE_OBJECTIVES, auxiliary_losses, contrastive_loss
from comoe.objectives.reference import comoe_loss, load_balance_loss, moelora_loss

__all__ = [
    "CONTRASTIVE_OBJECTIVES",
    "auxiliary_losses",
    "comoe_loss",
    "contrastive_loss",
    "load_balance_loss",
    "moelora_loss",
]
