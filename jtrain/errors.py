"""The errors a user can cause and fix, and how every jtrain command reports them.

A `UserError`'s message says what was wrong and what to do; the commands print it as one
`error:` line and exit non-zero, with no traceback (it would bury the message) unless
`JTRAIN_DEBUG=1` is set. The subclasses live with the code that raises them (ConfigError in
jtrain.validation, CheckpointError in jtrain.checkpoint, ...).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys

DEBUG_VARIABLE = "JTRAIN_DEBUG"


class UserError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class DataError(UserError, ValueError):
    """Data that cannot be read or used; the message names the file (and line or tensor)."""


# OS errors a user fixes on their side (space, permissions, paths), by errno: what to do.
_OS_REMEDIES = {
    errno.ENOSPC: "free space there or use another --workdir",
    errno.EDQUOT: "free space there or use another --workdir",
    errno.EACCES: "check its permissions, or use another path",
    errno.EPERM: "check its permissions, or use another path",
    errno.EROFS: "the filesystem is read-only: use another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: use another path",
    errno.EISDIR: "it is a directory, not a file: check the path",
}


def describe_os_error(err: OSError) -> str | None:
    """One line for an OSError the user can fix ("no space left on device at PATH: ..."),
    or None for one that is jtrain's own problem."""
    remedy = _OS_REMEDIES.get(err.errno)
    if remedy is None:
        return None
    reason = (err.strerror or os.strerror(err.errno)).lower()
    where = f" at {err.filename}" if err.filename else ""
    return f"{reason}{where}: {remedy}"


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


@contextlib.contextmanager
def reported(prefix: str = "error"):
    """Ends the process with one `PREFIX: message` line for a UserError or a user-fixable
    OSError (exit status 1), and with status 130 on Ctrl-C; re-raises them unchanged under
    JTRAIN_DEBUG=1."""
    try:
        yield
    except UserError as err:
        if debugging():
            raise
        sys.exit(f"{prefix}: {err}")
    except OSError as err:
        line = describe_os_error(err)
        if line is None or debugging():
            raise
        sys.exit(f"{prefix}: {line}")
    except KeyboardInterrupt:
        # Ctrl-C before training's own handler is installed (loading, compiling) or in a
        # command without one: nothing was being saved, so say so and stop as shells expect.
        if debugging():
            raise
        sys.stderr.write("jtrain: interrupted (Ctrl-C)\n")
        sys.exit(130)
