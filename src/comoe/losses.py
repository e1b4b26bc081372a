"""The reference loss definitions under their first public name; they live in comoe.objectives.reference."""

from comoe.objectives.reference import *  # noqa: F403
from comoe.objectives.reference import __all__  # noqa: F401
