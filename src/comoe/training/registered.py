"""The registry-backed names of a training run's adapter config, checked before any model loads.

The settings (pure Python, read before torch is imported) check the rest of the config; these names live in
registries that torch modules fill (and plugins extend), so they are checked here, importing the registries
only (about a second), not transformers or the base model.
"""

from __future__ import annotations

from comoe.moe.banks import ffn_bank, get_bank
from comoe.moe.experts import choose_strategy
from comoe.moe.routing import get_routing
from comoe.objectives.auxiliary import usable_objectives
from comoe.settings import locate
from comoe.training.settings import TrainArgs
from comoe.validation import InvalidSetting


def check_registered_names(args: TrainArgs) -> None:
    """Every registry-backed name of the run's adapter config is registered (after importing the plugins
    once): the routing kind (comoe.moe.routing), the expert bank (comoe.moe.banks), the mix strategy
    `expert_compute` (comoe.moe.experts) and the `aux_objectives` (comoe.objectives.registry; training
    needs every one, so an unregistered one is an error, not the inference loader's warning). The settings
    check the rest of the config without torch; these names need the registries, so the training entry
    checks them before any model loads. Raises InvalidSetting worded as the settings' other errors, naming
    the YAML file and field: `X.yaml: adapter_config: routing='topkk' is not a registered routing ...`."""
    config = args.comoe_config()
    try:
        get_routing(config.routing)
        (ffn_bank if config.ffn_experts else get_bank)(config.expert_bank)  # ffn_bank: get_bank + its check
        choose_strategy(config.expert_compute, config.num_experts, config.top_k)
        usable_objectives(config, strict=True)
    except ValueError as error:
        raise adapter_config_error(args, error) from None
    if config.zero_objective:  # training a loss that cannot move is a mistake, not a choice
        raise adapter_config_error(args, ValueError(config.zero_objective))


def adapter_config_error(args: TrainArgs, error: ValueError) -> InvalidSetting:
    """An error of the run's adapter config found after the settings loaded, worded as their other errors
    (naming the YAML file: `X.yaml: adapter_config: ...`)."""
    return locate(args, InvalidSetting("adapter_config", f"adapter_config: {error}"))
