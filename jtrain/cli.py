"""What every jtrain command does first: parse the flags with errors a user can read, refuse
stray arguments, quiet absl's INFO logs."""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging

from jtrain import errors


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but a misspelled config key or a missing config file ends in one
    `error:` line instead of a long traceback (ml_collections raises those while parsing)."""
    missing = _missing_config_file(argv)
    if missing:
        _fail(f"--config={missing}: no such config file (the recipes are in configs/)")
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        _fail(str(err).replace("\n", " ") + " (--helpshort lists the flags)")
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as err:
        if errors.debugging():
            raise
        _fail(_config_flag_problem(err))
    raise AssertionError("unreachable")


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _missing_config_file(argv: list[str]) -> str | None:
    """The --config file named in argv when it does not exist (ml_collections would say so
    only in a traceback, once main reads the flag)."""
    for i, arg in enumerate(argv[1:], start=1):
        value = arg.removeprefix("--config=") if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        path = value.split(":", 1)[0] if value else None
        if path and not os.path.isfile(path):
            return path
    return None


def _config_flag_problem(err: Exception) -> str:
    """One line for a --config.KEY=VALUE override that ml_collections refused."""
    message = " ".join(str(err.args[0] if err.args else err).replace("\\n", " ").split())
    if not isinstance(err, (AttributeError, KeyError)):
        return f"a --config override is invalid: {message}"
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', message)
    if suggestion:
        wrong, right = suggestion.group(2), suggestion.group(1)
        return f"a --config override names no config key {wrong!r}; did you mean {right!r}?"
    name = re.search(r"[A-Za-z_][\w.]*", message)
    key = name.group(0) if name else message
    return f"a --config override names no config key {key!r} (see the config file's keys)"


def start(argv: list[str]) -> None:
    """Raises UsageError for positional arguments; logs at WARNING unless --verbosity is set."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
