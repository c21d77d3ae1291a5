"""`--set KEY=VALUE` for the benchmark scripts: config overrides typed like the default."""

from __future__ import annotations


def apply(config, items: list[str]):
    """Sets each dotted `KEY=VALUE` on `config`, converted to the type of the value it replaces."""
    for item in items:
        key, value = item.split("=", 1)
        *parents, name = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        old = node[name]
        node[name] = value.lower() in ("1", "true") if isinstance(old, bool) else type(old)(value)
    return config
