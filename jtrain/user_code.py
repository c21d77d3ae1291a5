"""Importing what a config names from the user's own code: `module.path:name`."""

from __future__ import annotations

import importlib
import os
import sys


def attribute(target: str) -> tuple[str, str, object | None]:
    """(module name, attribute name, the attribute or None) of `module.path:name`.

    The working directory is importable, as for configs/: the user's code sits beside their
    command. Import errors propagate, for the caller to say which setting named the module.
    """
    module_name, _, name = target.rpartition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    return module_name, name, getattr(module, name, None)
