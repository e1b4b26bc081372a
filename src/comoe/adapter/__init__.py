"""The adapter: which modules are adapted, the routed LoRA layer, the model wrapper, and the folder format."""

from comoe.adapter.layer import ComoeLinear
from comoe.adapter.model import ComoeModel, get_comoe_model

__all__ = ["ComoeLinear", "ComoeModel", "get_comoe_model"]
