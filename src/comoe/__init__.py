"""comoe: mixtures of LoRA experts with contrastive expert objectives (CoMoE, MoELoRA)."""

from comoe.config import ComoeConfig, matched_lora_config
from comoe.model import ComoeModel, get_comoe_model

__all__ = ["ComoeConfig", "ComoeModel", "get_comoe_model", "matched_lora_config"]
