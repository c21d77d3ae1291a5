"""What happens when checkpoints fail: damaged ones passed over and moved aside, failed saves
explained.

Reading walks back from the newest checkpoint to the newest that reads (`newest_readable`);
any failure to read one is damage, except a UserError (a checkpoint of another model is
refused, not passed over). A training run moves damaged checkpoints (unreadable, or whose
checksums do not match) out of the way, never deletes them: they may be evidence of a failing
disk. Each goes to WORKDIR/checkpoints.damaged/STEP with a note saying why, outside the
directory Orbax manages, so the run that fell back to an older step can save that step again.
In a multi-process run every process must reach the same verdict before any goes on
(`on_every_process`), and process 0 alone moves.

A failed save surfaces as an exception from deep inside Orbax or TensorStore; `cause` finds
the operating-system error in it (TensorStore reports one only as text, "...
[os_error_code='28']") so jtrain can say "no space left on device at PATH". Orbax also logs
each failure with a traceback from its background threads, several times over, and a failed
read leaves TensorStore printing "Event loop is closed"; jtrain raises the failure once, so
`quiet_orbax_failures` drops the rest (kept under JTRAIN_DEBUG=1).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from jtrain import atomic, errors

T = TypeVar("T")
log = logging.getLogger(__name__)
NOTE = "DAMAGED.txt"


class ReadElsewhere(RuntimeError):
    """Another process of the run could not read the checkpoint."""


def on_every_process(read: Callable[[], T]) -> T:
    """read(), agreed by every process: if it failed on any, it fails on all, so no process
    goes on to restore a step the others gave up on."""
    if jax.process_count() == 1:
        return read()
    try:
        result, error = read(), None
    except Exception as err:  # noqa: BLE001 - re-raised below, after the others heard of it
        result, error = None, err
    readable = multihost_utils.process_allgather(np.asarray(error is None))
    if error is not None:
        raise error
    if not np.all(readable):
        raise ReadElsewhere("another process of the run could not read it")
    return result


def newest_readable(
    directory: str, steps: list[int], read: Callable[[int], T]
) -> tuple[int | None, T | None, list[tuple[int, str]]]:
    """(step, read(step), damaged) for the newest of `steps` that reads ((None, None,
    damaged) if none does), where damaged lists (step, why) of those passed over. A UserError
    (such as a checkpoint of another model) and running out of memory are raised: they are
    not damage."""
    damaged = []
    for step in reversed(steps):
        try:
            result = read(step)
        except (errors.UserError, MemoryError):
            raise
        except Exception as err:  # noqa: BLE001 - any other read failure means damaged
            if _out_of_memory(err):
                raise
            why = _reason(err)
            older = "; trying an older one" if step != steps[0] else ""
            log.warning("checkpoint %s/%d is damaged (%s)%s", directory, step, why, older)
            damaged.append((step, why))
            continue
        if damaged:
            log.warning("using checkpoint %s/%d, the newest readable one", directory, step)
        return step, result, damaged
    return None, None, damaged


def _out_of_memory(err: Exception) -> bool:
    """A device that cannot hold the restored state: every checkpoint would fail alike."""
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


def _reason(err: BaseException) -> str:
    """The first line of the innermost cause (Orbax wraps TensorStore's precise error)."""
    while err.__cause__ is not None:
        err = err.__cause__
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:300]}"


def damage(directory: str, damaged: list[tuple[int, str]]) -> str:
    """'DIR/STEP is damaged (why); ...' for messages."""
    return "; ".join(f"{directory}/{step} is damaged ({why})" for step, why in damaged)


def damaged_directory(checkpoints_dir: str) -> str:
    """Where the damaged checkpoints of `checkpoints_dir` go: a sibling, outside Orbax's."""
    return os.path.normpath(checkpoints_dir) + ".damaged"


def move_aside(checkpoints_dir: str, step: int, reason: str, *, fell_back_to: int) -> str:
    """Moves checkpoint `step` into the damaged directory (as STEP, or STEP.2, ... when an
    earlier damaged copy holds that name) with a note of why; returns its new path."""
    aside = damaged_directory(checkpoints_dir)
    os.makedirs(aside, exist_ok=True)
    target, n = os.path.join(aside, str(step)), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(aside, f"{step}.{n}")
    source = os.path.join(checkpoints_dir, str(step))
    os.rename(source, target)
    note = (
        f"jtrain moved checkpoint step {step} here from {source}\n"
        f"at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: it is damaged.\n"
        f"reason: {reason}\n"
        f"The run fell back to step {fell_back_to}. Nothing reads this directory; keep it to "
        "investigate the disk, or delete it.\n"
    )
    atomic.write(os.path.join(target, NOTE), lambda path: _write_text(path, note))
    return target


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# TensorStore's text for an OS error: ... "PATH": Failed to write ... [os_error_code='28']
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)'?")
_QUOTED = re.compile(r'"([^"]+)"')


def _from_tensorstore(message: str) -> OSError | None:
    code = _TENSORSTORE_OS_ERROR.search(message)
    if code is None:
        return None
    paths = [p for p in _QUOTED.findall(message[: code.start()]) if os.sep in p]
    number = int(code.group(1))
    return OSError(number, os.strerror(number), paths[-1] if paths else None)


def cause(err: BaseException) -> OSError | None:
    """The operating-system error behind `err`, following its causes and contexts."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err
        found = _from_tensorstore(str(err))
        if found is not None:
            return found
        err = err.__cause__ or err.__context__
    return None


def describe(err: BaseException) -> str:
    """One line for why a save failed: the OS error and its remedy when there is one."""
    os_error = cause(err)
    if os_error is None:
        return f"{_reason(err)} ({errors.DEBUG_VARIABLE}=1 shows where)"
    line = errors.describe_os_error(os_error)
    if line is not None:
        return line
    where = f" at {os_error.filename}" if os_error.filename else ""
    return f"{(os_error.strerror or os.strerror(os_error.errno)).lower()}{where}"


def _from_orbax(filename: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in filename


class _OrbaxErrorLogs(logging.Filter):
    """Drops Orbax's ERROR records: every failure they log reaches jtrain as an exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or not _from_orbax(record.pathname)


def _leftover(value: BaseException | None, origin: object = None) -> bool:
    """Whether an exception is the debris of a failed read: TensorStore completing reads for
    an Orbax event loop already closed by the failure, or Orbax's abandoned coroutines."""
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    code = getattr(origin, "cr_code", None)
    return code is not None and _from_orbax(code.co_filename)


_quieted = False


def quiet_orbax_failures() -> None:
    """Drops what a failed Orbax save or restore prints besides the exception jtrain gets:
    its logged tracebacks and the debris of its abandoned reads (both kept under
    JTRAIN_DEBUG=1). Installed once per process; everything else passes unchanged."""
    global _quieted
    if _quieted or errors.debugging():
        return
    _quieted = True
    logging.getLogger("absl").addFilter(_OrbaxErrorLogs())  # Orbax logs through absl
    previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, traceback) -> None:  # TensorStore's threads print through it
        if not _leftover(value):
            previous_excepthook(kind, value, traceback)

    def unraisablehook(unraisable) -> None:
        if not _leftover(unraisable.exc_value, unraisable.object):
            previous_unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
