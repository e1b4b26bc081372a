"""Auxiliary objectives: the registry of named objectives, their fast paths, and (in `reference`, imported
only by tests and benchmarks) the plain definitions they are tested against."""

from comoe.objectives.auxiliary import (
    AuxiliaryLosses,
    auxiliary_losses,
    compute_auxiliary_losses,
    contrastive_loss,
)
from comoe.objectives.balance import load_balance_loss
from comoe.objectives.registry import OBJECTIVES, Objective, get_objective, register_objective

__all__ = [
    "OBJECTIVES",
    "AuxiliaryLosses",
    "Objective",
    "auxiliary_losses",
    "compute_auxiliary_losses",
    "contrastive_loss",
    "get_objective",
    "load_balance_loss",
    "register_objective",
]
