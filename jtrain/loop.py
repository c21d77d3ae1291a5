"""The training loop: take a batch, step, let the hooks act, repeat; one loop for every task.

The loop never waits on the device without need: step n's metrics are read only after step
n+1 has been dispatched, so the device always has queued work. It owns three things only:
compiling the step once (timed, so `compile_time` is compilation alone), the non-finite policy
and preemption; evaluation, checkpoints, logs and the end-of-run display are hooks.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Protocol

import jax
import ml_collections

from jtrain import checkpoint, console, metrics
from jtrain.errors import UserError
from jtrain.experiment import Experiment
from jtrain.hooks import Hook
from jtrain.state import TrainState


class NonFiniteError(UserError, RuntimeError):
    """Training met a non-finite loss or gradient under train.on_nonfinite='halt'."""


class BatchSource(Protocol):
    """Where the loop's batches come from: an input pipeline, or rollouts that read the state."""

    def next(self, state: TrainState) -> dict[str, jax.Array]:
        """The global (sharded) batch for the step that `state` is about to take."""
        ...

    def get_state(self) -> Any:
        """The position to checkpoint (JSON-serialisable)."""
        ...

    def set_state(self, position: Any) -> None:
        """Resumes at a checkpointed position."""
        ...

    def metrics(self) -> dict[str, float]:
        """Optional: host metrics about the batch `next` last gave (rollout rewards), logged
        with the step's train metrics."""
        ...


def _source_metrics(batches: BatchSource) -> dict[str, float]:
    return batches.metrics() if hasattr(batches, "metrics") else {}


class PipelineBatches:
    """A Grain iterator of this process's rows, assembled into global batches."""

    def __init__(self, iterator, exp: Experiment):
        self.iterator, self.exp = iterator, exp

    def next(self, state: TrainState) -> dict[str, jax.Array]:
        return self.exp.global_batch(next(self.iterator))

    def get_state(self) -> Any:
        return self.iterator.get_state()

    def set_state(self, position: Any) -> None:
        self.iterator.set_state(position)

    def metrics(self) -> dict[str, float]:
        return {}


@dataclasses.dataclass
class Loop:
    """A run's steps and the hooks around them."""

    config: ml_collections.ConfigDict
    exp: Experiment
    batches: BatchSource
    hooks: list[Hook]
    writer: metrics.MetricWriter
    ckpts: checkpoint.Checkpoints
    started: float  # time.perf_counter() at the start of the run
    results: dict[str, dict] = dataclasses.field(default_factory=dict)
    # Why the run ended before train.steps (early stopping); set by a hook via `stop`.
    stop_reason: str | None = None
    end_step: int = 0  # the last step taken: train.steps, or where the run stopped
    final_step: int = 0  # the step of the weights the run ends with (early stopping: the best)

    def __post_init__(self):
        self.throughput = metrics.Throughput(self.exp)

    @property
    def workdir(self) -> str:
        return os.path.dirname(self.ckpts.directory)

    def stop(self, reason: str) -> None:
        """Ends the run after the current step's hooks, as if it were the last."""
        self.stop_reason = reason

    def run(self, state: TrainState, first_step: int, preemption) -> tuple[TrainState, bool]:
        """Runs steps first_step+1 .. train.steps (or until a hook stops the run), then lets
        the hooks pick the final weights and finish; returns them and whether preempted."""
        try:
            return self._run(state, first_step, preemption)
        finally:  # an error's message, too, starts below the progress bar, not after it
            console.close()

    def _run(self, state: TrainState, first_step: int, preemption) -> tuple[TrainState, bool]:
        self.end_step = self.final_step = first_step
        for hook in self.hooks:
            hook.on_start(self, state, first_step)
        preempted = False
        if self.stop_reason is None:  # a run that stopped early before stays stopped
            state, preempted = self._steps(state, first_step, preemption)
        self._report_skipped(state)
        if not preempted:
            self.final_step = self.end_step
            for hook in self.hooks:
                state = hook.final_state(self, state)
        for hook in self.hooks:
            hook.on_end(self, state, preempted=preempted)
        return state, preempted

    def _report_skipped(self, state: TrainState) -> None:
        """Under on_nonfinite=skip, says how many updates the whole run dropped (a resume
        included: the count lives in the state) and records it with the train results."""
        skipped = int(jax.device_get(state.skipped))
        if skipped:
            steps = int(jax.device_get(state.step))
            console.status(
                f"jtrain: warning: {skipped} of {steps} updates were skipped (non-finite)"
            )
            self.writer.write(self.end_step, "train", {"skipped_updates": skipped})
            self.results.setdefault("train", {})["skipped_updates"] = skipped

    def _steps(self, state: TrainState, first_step: int, preemption) -> tuple[TrainState, bool]:
        last = self.config.train.steps
        train_step, previous = None, None  # previous: (step, metrics), read once n+1 runs
        for step in range(first_step + 1, last + 1):
            self.end_step = step
            batch = self.batches.next(state)
            if train_step is None:
                train_step = self._compile(state, batch, step)
            # Marks the step in a profiler trace (profile.steps): XProf's step-time view.
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = train_step(state, batch)
            step_metrics = {**step_metrics, **_source_metrics(self.batches)}
            if previous is not None:
                self._finish(*previous)
            previous = (step, step_metrics)
            preempted = preemption.reached(step)
            due = [h for h in self.hooks if h.due(step, last=step == last, preempted=preempted)]
            if not (due or preempted):
                continue
            self._finish(*previous)
            previous = None
            for hook in due:
                hook.run(self, step, state)
            self.throughput.restart(step)  # evaluation and saving are not throughput
            if preempted:
                self.ckpts.wait()
                console.status(
                    f"jtrain: preempted; saved step {step} in {self.ckpts.directory}; "
                    "run the same command again to resume"
                )
                return state, True
            if self.stop_reason is not None:
                console.status(f"jtrain: stopped at step {step}: {self.stop_reason}")
                return state, False
        if previous is not None:  # no hook was due after the last step
            self._finish(*previous)
        return state, False

    def _compile(self, state: TrainState, batch, step: int):
        """The step compiled for these shapes; logs the compilation time alone."""
        start = time.perf_counter()
        compiled = self.exp.train_step.lower(state, batch).compile()
        self.writer.write(step, "train", {"compile_time": time.perf_counter() - start})
        self.throughput.restart(step - 1)
        return compiled

    def _finish(self, step: int, step_metrics) -> None:
        """Applies the non-finite policy to a finished step, then the hooks' on_step."""
        if float(step_metrics["nonfinite"]):
            if self.config.train.on_nonfinite == "halt":
                self.ckpts.wait()  # so the step named below is committed, not in flight
                steps = self.ckpts.steps()
                where = f"step {steps[-1]} in {self.ckpts.directory}" if steps else "none yet"
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {step}; its update was not applied. "
                    f"Last good checkpoint: {where}. Lower optimizer.lr, check the data, or set "
                    "--config.train.on_nonfinite=skip to drop such steps and go on."
                )
            console.status(f"warning: non-finite loss or gradient at step {step}; update skipped")
        for hook in self.hooks:
            hook.on_step(self, step, step_metrics)
