"""comoe: mixtures of LoRA experts with contrastive expert objectives (CoMoE, MoELoRA).

The names below are imported on first use (PEP 562), so `import comoe` and the command line's --help load
neither torch nor peft until a name that needs them is touched.

The library prints nothing: progress and warnings go to the "comoe" logger (each module logs to its child
logger, `comoe.training.loop`, ...), silent until the application configures logging; the command line
shows them on stdout.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from comoe.adapter.lora import matched_lora_config
    from comoe.adapter.model import ComoeModel, get_comoe_model
    from comoe.config import ComoeConfig
    from comoe.models.loading import load_base
    from comoe.training.loop import train
    from comoe.training.settings import TrainArgs

_EXPORTS = {
    "ComoeConfig": "comoe.config",
    "ComoeModel": "comoe.adapter.model",
    "get_comoe_model": "comoe.adapter.model",
    "AutoComoeModelForCausalLM": "comoe.models.auto",
    "ComoeTrainer": "comoe.integrations.trainer",
    "matched_lora_config": "comoe.adapter.lora",
    "load_base": "comoe.models.loading",
    "train": "comoe.training.loop",
    "TrainArgs": "comoe.training.settings",
}

# The standard library's convention for libraries: a NullHandler on the top logger, so that nothing is
# written (not even warnings, by logging's last-resort handler) unless the application asks for it.
logging.getLogger("comoe").addHandler(logging.NullHandler())

__all__ = [
    "AutoComoeModelForCausalLM",
    "ComoeConfig",
    "ComoeModel",
    "ComoeTrainer",
    "TrainArgs",
    "get_comoe_model",
    "load_base",
    "matched_lora_config",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'comoe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
