"""Files written whole or not at all: a reader (or a run killed mid-write) never sees half.

The content goes to a temporary file next to the target, which is then renamed over it
(`os.replace` is atomic on POSIX filesystems). The temporary name is not `mkstemp`'s, so the
file gets the umask's usual permissions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def write(path: str, write_to: Callable[[str], None]) -> None:
    """Calls write_to(temporary path) next to `path`, then renames it into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        write_to(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_json(path: str, content, *, indent: int | None = 1) -> None:
    """`content` as JSON (and a final newline) at `path`."""

    def dump(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=indent)
            f.write("\n")

    write(path, dump)
