"""Checks of config values that name the key, the value and what is allowed.

Every module that owns config keys (the model family, the task, the optimizer, the data
pipeline, LoRA) validates them with these helpers, so every message has one shape:
`config.KEY=VALUE is invalid: WHAT IS ALLOWED.`
"""

from __future__ import annotations

from collections.abc import Iterable

from jtrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message says which key and what is allowed."""


def require(ok: bool, key: str, value, allowed: str) -> None:
    """Raises ConfigError for `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"config.{key}={value!r} is invalid: {allowed}.")


def one_of(key: str, value, allowed: Iterable) -> None:
    """Raises ConfigError unless `value` is one of `allowed`."""
    allowed = tuple(allowed)
    require(value in allowed, key, value, f"allowed: {', '.join(map(str, allowed))}")


def positive_ints(section, prefix: str, names: Iterable[str]) -> None:
    """Raises ConfigError unless every `section[name]` is a positive integer."""
    for name in names:
        value = section[name]
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        require(ok, f"{prefix}.{name}", value, "must be a positive integer")
