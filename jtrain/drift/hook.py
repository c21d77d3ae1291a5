"""The end-of-run hook that saves a run's drift profile (WORKDIR/drift/profile.json + .npz)
from its final weights, for every task that has a profiler.

A convenience like the plots: should profiling fail (a task's data no longer readable, a
model that cannot run on the host), the run ends as it would have, with one line saying why
and the command that writes the profile later.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.experimental import multihost_utils

from jtrain import console
from jtrain.errors import UserError
from jtrain.hooks import Hook


def hooks(config) -> list[Hook]:
    """The DriftProfile hook unless `drift.profile` is off."""
    return [DriftProfile()] if config.get("drift", {}).get("profile", True) else []


class DriftProfile(Hook):
    """Profiles the train split under the final weights (process 0 writes). Not when
    preempted: the resumed run profiles at its end."""

    def on_end(self, loop, state, *, preempted) -> None:
        from jtrain.drift import build, profilers  # scipy and scikit-learn: only when profiling

        task = loop.exp.task
        if preempted or not profilers.has(task.name):
            return
        params = state.model_params
        if jax.process_count() > 1:  # every process takes part in the gather
            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return
        try:
            model = nnx.merge(loop.exp.graphdef, jax.device_get(params))
            path = build.write_profile(loop.workdir, task, model, step=loop.final_step)
        except Exception as err:  # profiling must never cost a finished run
            text = " ".join(str(err).split())
            why = text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"
            console.status(
                f"jtrain: no drift profile written ({why}); write it with: "
                f"python -m jtrain.drift --workdir={loop.workdir} --write_profile"
            )
            return
        console.status(f"jtrain: drift profile written to {path}")
