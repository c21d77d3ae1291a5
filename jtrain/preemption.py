"""Stopping a run cleanly when asked: the signal is noted, the loop finishes its step, saves a
checkpoint and exits, so the run resumes exactly where it stopped."""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    """Notices SIGTERM (what schedulers send before killing) so the loop can save and exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        # With several processes, JAX's own notifier (set up by jax.distributed.initialize)
        # must receive SIGTERM: a Python handler would replace it, and the processes would
        # never agree on a step to stop at.
        single = jax.process_count() == 1
        if single and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        print("SIGTERM received: finishing this step, saving a checkpoint, then exiting")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, step: int) -> bool:
        """True on every host at the same step once any host was asked to stop."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested
