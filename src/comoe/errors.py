"""Exceptions a user can cause and act on; the command line prints them as one line and exits 2."""

from __future__ import annotations


class NonFiniteLoss(RuntimeError):
    """Training met a non-finite loss (or skipped too many such batches): the run diverges."""


class UnregisteredName(ValueError):
    """A name (objective, expert bank, mix strategy, record format) no module registered in this process:
    the message lists the registered names and how to import a plugin (comoe.plugins)."""


PLUGIN_HINT = "a name of your own: import the module that registers it (--plugin MODULE, or COMOE_PLUGINS)"


class AdapterMismatch(ValueError):
    """An adapter whose tensors do not fit the base model it is applied to (other shapes, other modules).
    `differences`: each differing tensor, one string each (empty where the message alone says it)."""

    def __init__(self, message: str, differences: list[str] | None = None) -> None:
        super().__init__(message)
        self.differences = differences or []


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with the step reached and how to continue (still a KeyboardInterrupt)."""


# What the command line reports as a user error (one line, exit 2) rather than a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    ImportError,
    OSError,  # unreadable or full folders, a model that cannot be found: the message names the path
    NonFiniteLoss,
)
