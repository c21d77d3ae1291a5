"""How far a run is and how long it has left: a progress bar on a terminal, the time left on
the train log lines elsewhere.

JTRAIN_PROGRESS picks the display: `bar` (redrawn in place, below the metric lines), `log`
(` | eta 2m13s` added to the train lines on stdout, no control characters: files, CI logs) or
`off`; unset, a terminal gets the bar and anything else the log. Only process 0 shows either.

The time left is the steps left at the steady step rate: the recent gaps between finished
steps, leaving out those far above the typical one, which are pauses (compiling, evaluating,
saving) rather than steps. The remaining pauses are not counted, and a run with early
stopping may end before train.steps: the time left is to train.steps.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping

import jax

from jtrain import console
from jtrain.errors import UserError
from jtrain.hooks import Hook

VARIABLE = "JTRAIN_PROGRESS"
MODES = ("bar", "log", "off")
REDRAW_SECONDS = 0.2  # the bar is redrawn at most 5 times a second
PAUSE = 3.0  # a gap this many times the typical step is a pause, not a step
WINDOW = 50  # the rate is over the latest gaps: it follows a run that speeds up or slows down
_BAR_WIDTH = 30


class ProgressSettingError(UserError, ValueError):
    """JTRAIN_PROGRESS holds a value that names no display."""


def chosen_mode(stdout=None) -> str:
    """bar | log | off: JTRAIN_PROGRESS, else a bar on a terminal and the log elsewhere."""
    value = os.environ.get(VARIABLE, "").strip().lower()
    if value in MODES:
        return value
    if value not in ("", "auto"):
        raise ProgressSettingError(
            f"{VARIABLE}={os.environ[VARIABLE]!r} is invalid: allowed: {', '.join(MODES)} "
            "(unset: a bar on a terminal, the time left on the log lines elsewhere)."
        )
    stdout = sys.stdout if stdout is None else stdout
    return "bar" if stdout.isatty() else "log"


def duration(seconds: float) -> str:
    """A short human duration: 45s, 2m13s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepRate:
    """The steady time per step of a run, from the times its steps finished."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, window: int = WINDOW):
        self.clock = clock
        self._gaps: collections.deque[float] = collections.deque(maxlen=window)
        self._previous: tuple[int, float] | None = None

    def tick(self, step: int) -> None:
        """Notes that `step` has finished now."""
        now = self.clock()
        if self._previous is not None and step > self._previous[0]:
            self._gaps.append((now - self._previous[1]) / (step - self._previous[0]))
        self._previous = (step, now)

    def seconds_per_step(self) -> float | None:
        """The mean of the recent gaps that are steps, not pauses; None before two ticks."""
        if not self._gaps:
            return None
        typical = statistics.median_low(self._gaps)  # low: of two gaps, a step beats a pause
        steps = [gap for gap in self._gaps if gap <= PAUSE * typical]
        return sum(steps) / len(steps)

    def time_left(self, step: int, last: int) -> float | None:
        """Seconds for steps step+1 .. last at the steady rate; None while it is unknown."""
        per_step = self.seconds_per_step()
        return None if per_step is None else max(0, last - step) * per_step


def rate_text(seconds_per_step: float) -> str:
    """12.3 steps/s, or 2.41 s/step for steps slower than a second."""
    if seconds_per_step >= 1:
        return f"{seconds_per_step:.2f} s/step"
    per_second = 1 / seconds_per_step if seconds_per_step > 0 else float("inf")
    return f"{per_second:.1f} steps/s" if per_second < 100 else f"{per_second:,.0f} steps/s"


class Progress(Hook):
    """Shows the run's progress (a bar, or the time left on the train lines; `chosen_mode`).

    Wired first among the hooks, so it notes each step before the train log line of that step
    is printed, and ends the bar before the end-of-run lines (the test split, the sample).
    """

    def __init__(
        self, last: int, *, mode: str | None = None, clock: Callable[[], float] = time.perf_counter
    ):
        self.last, self.mode, self.clock = last, mode or chosen_mode(), clock
        self.rate = StepRate(clock)
        self.step, self.started, self.ending = 0, clock(), None
        self._drawn_at: float | None = None
        self.active = self.mode != "off" and jax.process_index() == 0

    def on_start(self, loop, state, step) -> None:
        if not self.active:
            return
        self.step, self.started = step, loop.started
        console.show(self)
        if step < self.last:  # a run with steps left: the bar is there while it compiles
            self._draw()

    def on_step(self, loop, step: int, step_metrics: Mapping) -> None:
        if not self.active:
            return
        self.step = step
        self.rate.tick(step)
        if self._drawn_at is None or self.clock() - self._drawn_at >= REDRAW_SECONDS:
            self._draw()

    def on_end(self, loop, state, *, preempted: bool) -> None:
        if not self.active:
            return
        self.step = loop.end_step
        self.ending = "preempted" if preempted else "stopped early" if loop.stop_reason else "done"
        if self._drawn_at is not None:  # the last frame says how the run ended
            self._draw()
        console.close()

    def _draw(self) -> None:
        if self.mode == "bar":
            self._drawn_at = self.clock()
            console.draw()

    def frame(self, width: int) -> str | None:
        """The bar's text, at most width - 1 columns (a full last column wraps some terminals)."""
        if self.mode != "bar":
            return None
        left = f"{self.step:>{len(str(self.last))}}/{self.last} "
        fraction = min(1.0, self.step / self.last) if self.last else 1.0
        per_step = self.rate.seconds_per_step()
        parts = [f"{fraction:4.0%}"]
        if per_step is not None:
            parts.append(rate_text(per_step))
        parts.append(f"{duration(self.clock() - self.started)} elapsed")
        left_s = self.rate.time_left(self.step, self.last)
        parts.append(self.ending or ("eta --" if left_s is None else f"eta {duration(left_s)}"))
        right = " " + " | ".join(parts)
        room = min(_BAR_WIDTH, width - 1 - len(left) - len(right) - 2)
        if room >= 5:
            filled = round(room * fraction)
            left += "[" + _fill(filled) + _empty(room - filled) + "]"
        return (left + right)[: max(0, width - 1)]

    def annotate(self, step: int, split: str, line: str) -> str:
        """In log mode, a train line gets the time left at its step (not the last step's)."""
        if self.mode != "log" or split != "train" or step >= self.last:
            return line
        left = self.rate.time_left(step, self.last)
        return line if left is None else f"{line} | eta {duration(left)}"


def _unicode_stdout() -> bool:
    return (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"


def _fill(n: int) -> str:
    return ("█" if _unicode_stdout() else "#") * n


def _empty(n: int) -> str:
    return ("░" if _unicode_stdout() else ".") * n
