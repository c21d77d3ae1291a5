"""A profiler trace of a few training steps (`profile.start_step`, `profile.steps`; 0 = off),
written to workdir/tensorboard/plugins/profile/<time>/<host>.xplane.pb for the Profile tab of
TensorBoard (with XProf installed) or the `xprof` viewer.

The trace starts after step start_step - 1, where the loop waits for the device (the hook is
due there), so no earlier step runs inside it; it stops once step start_step + steps - 1 has
finished on the device, before the hooks due at that step run. A window that begins at the
run's first step also holds the step's compilation. A run that ends, stops early or is
preempted inside the window stops the trace there, and one that fails stops it on the way out
(`stopped_on_exit`): the steps traced so far are written, and the next run in the same
process (a notebook) can trace again. Every process traces its own devices.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import jax

from jtrain import console
from jtrain.hooks import Hook


def hooks(config) -> list[Hook]:
    """The Profile hook when profile.steps > 0, else none."""
    p = config.profile
    return [Profile(p.start_step, p.steps, config.train.steps)] if p.steps else []


class Profile(Hook):
    """Traces steps `start`..`start + steps - 1` of the run (those up to `last`)."""

    def __init__(self, start: int, steps: int, last: int):
        self.start, self.end, self.last = start, min(start + steps - 1, last), last
        self.enabled = True
        self.logdir: str | None = None  # set while a trace runs

    def on_start(self, loop, state, step) -> None:
        if self.start > self.last:
            self._skip(f"profile.start_step={self.start} is after train.steps={self.last}")
        elif self.start <= step:
            self._skip(
                f"this run resumed after step {step}, past profile.start_step={self.start}; "
                "set a later start_step to trace it"
            )
        elif self.start == step + 1:  # no step before the window to start after
            self._begin(loop.workdir)

    def due(self, step, *, last, preempted) -> bool:
        return self.enabled and step in (self.start - 1, self.end)

    def run(self, loop, step, state) -> None:
        if step == self.start - 1:
            self._begin(loop.workdir)

    def on_step(self, loop, step, step_metrics) -> None:
        # Due at `end`, so the loop calls this before any hook's `run` there.
        if self.logdir is not None and step == self.end:
            jax.block_until_ready(step_metrics)  # the step's outputs: it has run
            self.stop(f"steps {self.start}..{step}")

    def final_state(self, loop, state):
        self.stop(f"steps {self.start}..{loop.end_step}")  # the run ended inside the window
        return state

    def on_end(self, loop, state, *, preempted) -> None:
        self.stop(f"steps {self.start}..{loop.end_step}")  # preempted inside the window

    def _skip(self, why: str) -> None:
        self.enabled = False
        _note(f"not profiling: {why}")

    def _begin(self, workdir: str) -> None:
        logdir = os.path.join(workdir, "tensorboard")
        try:
            jax.profiler.start_trace(logdir)
        except RuntimeError as err:  # one trace at a time: the caller's own is running
            self._skip(str(err))
            return
        self.logdir = logdir

    def stop(self, what: str = "the steps run") -> None:
        """Ends the trace if one runs and writes it; a trace that cannot be written is a
        warning, not the end of the run."""
        if self.logdir is None:
            return
        logdir, self.logdir = self.logdir, None
        self.enabled = False
        try:
            jax.profiler.stop_trace()
        except Exception as err:  # the trace is a by-product: training goes on without it
            _note(f"warning: the profiler trace of {what} could not be written: {err}")
            return
        where = os.path.join(logdir, "plugins", "profile")
        _note(f"profiled {what} into {where} (TensorBoard's Profile tab)")


@contextlib.contextmanager
def stopped_on_exit(loop_hooks: Iterable[Hook]):
    """Stops a trace still running when the block ends, however it ends (a failed run)."""
    try:
        yield
    finally:
        for hook in loop_hooks:
            if isinstance(hook, Profile):
                hook.stop("the steps before the run ended")


def _note(line: str) -> None:
    console.status(f"jtrain: {line}")  # process 0's, around the progress bar
