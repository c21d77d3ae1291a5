"""Packages that only some uses need, installed with an extra (`pip install "jtrain[prepare]"`).

The base install leaves them out to stay lean; the code that uses one imports it through
`need`, so a user without it reads one line naming the extra instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from jtrain.errors import UserError


class MissingExtraError(UserError, ImportError):
    """An optional package is not installed; the message names the extra that installs it.

    An ImportError, not a ValueError: readers count a ValueError as a bad file and go on.
    """


def need(module: str, *, extra: str, use: str) -> ModuleType:
    """Imports `module`, or raises MissingExtraError saying that `use` needs `extra`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise MissingExtraError(
            f"{use} needs {package}, which the base install leaves out: "
            f'pip install "jtrain[{extra}]"'
        ) from err
