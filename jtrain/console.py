"""What a run prints for the person watching it: status lines, metric lines, and one live line
(the progress bar) kept below them.

Every process of a multi-process run executes the same code, so a line about the run would
appear once per process: `status` prints it on process 0 only. A live display registers with
`show`; each line printed here first erases it and then draws it again underneath, so the bar
never tears a line and stays at the bottom of the terminal. `close` ends it, leaving its last
frame on a line of its own, however the run ends.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Protocol

import jax

_ERASE_LINE = "\r\x1b[K"  # to the start of the line, then erase to its end


class Live(Protocol):
    """A display that owns the terminal's last line (the progress bar)."""

    def frame(self, width: int) -> str | None:
        """The text to show now in a terminal `width` columns wide; None draws nothing."""
        ...

    def annotate(self, step: int, split: str, line: str) -> str:
        """The metric line of (`step`, `split`) with what this display adds (the time left)."""
        ...


_live: Live | None = None
_drawn = False  # whether a frame is on screen, the cursor at its end


def show(live: Live) -> None:
    """Makes `live` the display drawn below every line printed here, until `close`."""
    global _live
    close()
    _live = live


def draw() -> None:
    """Draws the live display's current frame in place of the previous one."""
    global _drawn
    if _live is None:
        return
    text = _live.frame(shutil.get_terminal_size().columns)
    if text is None:
        return
    sys.stdout.write(_ERASE_LINE + text)
    sys.stdout.flush()
    _drawn = True


def close() -> None:
    """Ends the live display; its last frame stays on screen and what follows starts below."""
    global _live, _drawn
    if _drawn:
        sys.stdout.write("\n")
        sys.stdout.flush()
    _live, _drawn = None, False


def status(message: str) -> None:
    """A line about the run, printed by process 0 only: every process knows the same thing."""
    if jax.process_index() == 0:
        _print(message)


def metric(step: int, split: str, line: str) -> None:
    """A metric line (MetricWriter's), with what the live display adds to it."""
    if _live is not None:
        line = _live.annotate(step, split, line)
    _print(line)


def erase_from_signal_handler() -> None:
    """Erases a drawn live line, so that a signal handler's own line takes its place and the
    bar is drawn again below it; only os.write, which takes no lock, is safe in a handler
    (print may fail with "reentrant call")."""
    global _drawn
    if _drawn:
        _drawn = False
        try:
            os.write(sys.stdout.fileno(), _ERASE_LINE.encode())
        except (OSError, ValueError):  # a stdout without a file descriptor (redirected)
            pass


def _print(line: str) -> None:
    global _drawn
    if _drawn:
        sys.stdout.write(_ERASE_LINE)
        _drawn = False
    print(line, flush=True)
    draw()
