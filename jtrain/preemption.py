"""Stopping a run cleanly when asked: the signal is noted, the loop finishes its step, saves a
checkpoint and exits, so the run resumes exactly where it stopped.

SIGTERM (what schedulers send before killing) and SIGINT (Ctrl-C) both ask for that stop. Once
a stop is under way, a repeated SIGTERM changes nothing (a scheduler that sends it twice still
gets a saved step and exit status 0), while Ctrl-C ends the process at once, without saving,
by SIGINT itself (the shell reports status 130, as for any program stopped by Ctrl-C): the
checkpoints committed before stay intact, and the next run resumes from the latest of them.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from jtrain import console

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class Preemption:
    """Notices SIGTERM and SIGINT so the loop can save and exit."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; the caller owns the signals
        # With several processes, JAX's own notifier (set up by jax.distributed.initialize)
        # must receive SIGTERM: a Python handler would replace it, and the processes would
        # never agree on a step to stop at. SIGINT is then passed on to it as a SIGTERM, so a
        # Ctrl-C on any process stops every process at the same step.
        if jax.process_count() == 1:
            self._install(signal.SIGTERM)
        # A SIGINT ignored from the start (a background job, nohup) stays ignored.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._install(signal.SIGINT)
        return self

    def _install(self, signum: int) -> None:
        self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            return  # a repeated SIGTERM: the stop is already under way
        self.requested = True
        quit_now = ""
        if signal.SIGINT in self._previous:
            # From now on Ctrl-C kills the process outright, even while the main thread waits
            # in compiled code, where no Python handler could run.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            quit_now = " (Ctrl-C to quit at once, without saving)"
        # os.write, not print: a handler that prints while the main thread is printing
        # fails with "reentrant call" on the stdout buffer. The progress bar's line is erased
        # first, so the message does not land at its end.
        console.erase_from_signal_handler()
        os.write(
            2,
            f"jtrain: {_NAMES[signum]} received: finishing this step, saving a checkpoint, "
            f"then exiting{quit_now}\n".encode(),
        )
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier: every process stops

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            if signum == signal.SIGTERM and self.requested:
                # The process is on its way out after saving: a repeated SIGTERM must not turn
                # that clean exit into status 143.
                previous = signal.SIG_IGN
            signal.signal(signum, previous)
        self._previous = {}

    def reached(self, step: int) -> bool:
        """True on every host at the same step once any host was asked to stop."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested
