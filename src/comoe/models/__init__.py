"""Base models: loading by alias, local folder or hub id, and the LM-head helpers shared by train and eval."""

from comoe.models.gguf import ALIASES
from comoe.models.loading import load_base

__all__ = ["ALIASES", "load_base"]
