"""What every jtrain command does first: set jtrain's XLA flags for NVIDIA GPUs
(jtrain.xla_flags), parse the flags with errors a user can read, refuse stray arguments, quiet
absl's INFO logs; and how each runs, from `python -m` or its console script (`jtrain-train`,
... in pyproject.toml)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from jtrain import errors, recipes, xla_flags


def config_flag() -> flags.FlagHolder:
    """--config, a config file or a recipe's name: defined once per process, so commands that
    share it (jtrain.main, jtrain.plan) can be imported together."""
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file(
            "config",
            None,
            "A config file (configs/NAME.py[:ARG]) or a recipe's name (default, lora, ...).",
            lock_config=True,
        )
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS["config"])


def run(main: Callable[[list[str]], None]) -> None:
    """Runs a command's `main` under absl with `parse_flags`; a UserError that `main` lets
    through ends in one `error:` line."""
    with errors.reported():
        xla_flags.apply()  # before anything starts jax's backend, which reads XLA_FLAGS once
        app.run(main, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but a misspelled config key or a missing config file ends in one
    `error:` line instead of a long traceback (ml_collections raises those while parsing), and
    `--config` takes a recipe's name (`--config=default`) as well as a file."""
    argv = _config_files_resolved(argv)
    _short_help_lists_jtrain_flags()
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        _fail(str(err).replace("\n", " ") + " (--helpshort lists the flags)")
    except BrokenPipeError:  # `--helpshort | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        sys.exit(0)
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as err:
        if errors.debugging():
            raise
        _fail(_config_flag_problem(err))
    raise AssertionError("unreachable")


def _fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _config_files_resolved(argv: list[str]) -> list[str]:
    """argv with a `--config` recipe name replaced by the recipe's file, since ml_collections
    reads a path (`--config=default` or `--config default`)."""
    out = list(argv)
    for i in range(1, len(argv)):
        if argv[i].startswith("--config="):
            out[i] = "--config=" + _config_file(argv[i].removeprefix("--config="))
        elif argv[i] == "--config" and i + 1 < len(argv):
            out[i + 1] = _config_file(argv[i + 1])
    return out


def _config_file(value: str) -> str:
    """The file `--config=value` means; a value naming neither a file nor a recipe ends here,
    in one line (ml_collections would say so only in a traceback, once main reads the flag)."""
    path = recipes.resolve(value)
    if path is None:
        _fail(f"--config={value}: {recipes.no_such_config()}")
    return path


def _short_help_lists_jtrain_flags() -> None:
    """A console script imports its command by module name, and absl's --helpshort lists only
    the flags of the module sys.argv[0] names (the script): make jtrain's flags the script's."""
    main = sys.argv[0]
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
        if module.startswith("jtrain.") and module != main:
            for flag in module_flags:
                flags.FLAGS.register_key_flag_for_module(main, flag)


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


def required(*names: str) -> None:
    """A UserError (one `error:` line) naming the first of these flags not given. Not absl's
    mark_flags_as_required: that marks the process-wide flag, and another command imported in
    the same process (tests, notebooks) would then refuse to parse without it."""
    for name in names:
        if flags.FLAGS[name].value is None:
            raise errors.UserError(f"--{name} is required (--helpshort lists the flags)")


def start(argv: list[str]) -> None:
    """Raises UsageError for positional arguments; logs at WARNING unless --verbosity is set."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
