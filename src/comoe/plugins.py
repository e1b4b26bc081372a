"""Plugins: modules of your own that register extensions (objectives, expert banks, mix strategies, record
formats, adapter methods) in every process that needs them.

A registry lives in the process that imported the registering module. A script that trains with its own
objective registers it by importing its module; `comoe eval` in another process, or
`AutoComoeModelForCausalLM` in a new session, must import it too. `load_plugins` imports:

- the modules named by the `comoe.plugins` entry-point group of installed packages
  (`[project.entry-points."comoe.plugins"] mine = "my_package.comoe_extensions"`);
- the modules named in the COMOE_PLUGINS environment variable (comma-separated);
- the modules given (the CLI's `--plugin MODULE`, repeatable).

The registries call it themselves, once, the first time a name is not found, so an installed plugin or
COMOE_PLUGINS needs nothing else. Pure Python: importing this module imports nothing of torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Iterable
from typing import Any

from comoe.errors import PLUGIN_HINT, UnregisteredName

ENTRY_POINT_GROUP = "comoe.plugins"
ENVIRONMENT_VARIABLE = "COMOE_PLUGINS"

logger = logging.getLogger(__name__)
_loaded: set[str] = set()
_discovered = False


def plugin_modules(names: Iterable[str] = ()) -> list[str]:
    """The module names to import: entry points, then COMOE_PLUGINS, then `names` (duplicates once)."""
    found = [point.value.split(":")[0] for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    found += [name.strip() for name in os.environ.get(ENVIRONMENT_VARIABLE, "").split(",") if name.strip()]
    found += [name.strip() for name in names if name.strip()]
    return list(dict.fromkeys(found))


def load_plugins(names: Iterable[str] = ()) -> list[str]:
    """Import every plugin module not imported yet (see the module docstring); returns the newly imported
    ones. ValueError naming the module when one cannot be imported."""
    new = []
    for name in plugin_modules(names):
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"plugin {name!r} could not be imported: {error}") from None
        _loaded.add(name)
        new.append(name)
        logger.debug("plugin %s imported", name)
    return new


def discover_once() -> bool:
    """For a registry that misses a name: import the installed and COMOE_PLUGINS plugins the first time it
    is asked in this process; True if any module was newly imported (then look the name up again)."""
    global _discovered
    if _discovered:
        return False
    _discovered = True
    return bool(load_plugins())


class Registry(dict):
    """A seam's table of registered entries by name (expert banks, routing kinds: their `name` attribute),
    which imports the plugins once (`discover_once`) the first time a name is missing. `field` is the
    config field that names an entry, `kind` what an entry is, for the error."""

    def __init__(self, field: str, kind: str) -> None:
        super().__init__()
        self.field, self.kind = field, kind

    def register(self, entry: Any) -> Any:
        """Add (or replace) an entry under its name; returns it (usable as a class decorator)."""
        self[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (tests register toy ones)."""
        self.pop(name, None)

    def lookup(self, name: str) -> Any:
        """The registered entry (after importing the plugins once if it is missing), or UnregisteredName
        (a ValueError) listing the registered names."""
        if name not in self:
            discover_once()
        if name not in self:
            raise UnregisteredName(
                f"{self.field}={name!r} is not a registered {self.kind}; valid: {', '.join(self)} "
                f"({PLUGIN_HINT})"
            )
        return self[name]
