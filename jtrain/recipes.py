"""The recipes that ship with jtrain, and what `--config` names: a config file, or a recipe.

The recipes are the repository's configs/ folder, installed as the package `jtrain.configs`
(pyproject.toml maps the folder), so `--config=default` works wherever jtrain is installed and
`--config=configs/default.py` in the repository. A recipe imports its base from
`jtrain.configs`; `directory` makes that package importable from a checkout pip has not
installed too (a copy of the repository on another machine).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import jtrain
from jtrain.errors import UserError

PACKAGE = "jtrain.configs"


def directory() -> Path:
    """The folder that holds the recipes."""
    _importable()
    return Path(importlib.import_module(PACKAGE).__file__).parent


def names() -> list[str]:
    """The recipes' names, sorted: what `--config=NAME` accepts (the files that define
    `get_config`; a base such as supervised.py is not one)."""
    files = directory().glob("*.py")
    return sorted(p.stem for p in files if "\ndef get_config(" in p.read_text(encoding="utf-8"))


def resolve(value: str) -> str | None:
    """The config file that `--config=value` means, its `:ARG` kept: an existing file as
    given, else a recipe's name as that recipe's file; None when `value` names neither."""
    path, colon, arg = value.partition(":")
    if os.path.isfile(path):
        return value
    if path in names():
        return f"{directory() / path}.py{colon}{arg}"
    return None


def no_such_config() -> str:
    """The rest of the one-line error for a config that names no file and no recipe."""
    return f"no such config file or recipe; give a file's path or a recipe: {', '.join(names())}"


def _importable() -> None:
    """Makes `jtrain.configs` importable when no installed copy provides it: a checkout run
    without `pip install -e .`, or whose editable install points at another copy."""
    if PACKAGE in sys.modules or importlib.util.find_spec(PACKAGE) is not None:
        return
    folder = Path(jtrain.__file__).resolve().parent.parent / "configs"
    init = folder / "__init__.py"
    if not init.is_file():
        raise UserError(f"jtrain's recipes ({PACKAGE}) are missing: reinstall jtrain")
    spec = importlib.util.spec_from_file_location(
        PACKAGE, init, submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    jtrain.configs = module
