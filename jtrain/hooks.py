"""What the loop runs around the step, on a schedule: evaluation, checkpoints, train logs and
the end-of-run display. Hooks know nothing of the task: metrics come from `Task.report`, the
display from `Task.show`.

A hook may act at four points: `on_start` (before the first step), `on_step` (each finished
step's metrics, read one step late so the device stays busy), `run` (after a step it is `due`
at; the loop then waits for the device) and `on_end`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jtrain import checkpoint, console, metrics, text_scores
from jtrain.data import pipeline
from jtrain.errors import DataError
from jtrain.experiment import Experiment
from jtrain.sampler import Sampler
from jtrain.state import TrainState


class Hook:
    """Does nothing at every point; subclasses override the points they use."""

    def on_start(self, loop, state: TrainState, step: int) -> None:
        """Before the first step of this process (`step` = the step restored or 0)."""

    def on_step(self, loop, step: int, step_metrics: Mapping) -> None:
        """After every step, with its (device) metrics."""

    def due(self, step: int, *, last: bool, preempted: bool) -> bool:
        """Whether `run` is called after this step."""
        return False

    def run(self, loop, step: int, state: TrainState) -> None:
        """After a step this hook is due at."""

    def final_state(self, loop, state: TrainState) -> TrainState:
        """The weights a finished run ends with (after the last step, before `on_end`);
        early stopping returns the best evaluation's and sets `loop.final_step`."""
        return state

    def on_end(self, loop, state: TrainState, *, preempted: bool) -> None:
        """After the last step (or the preempted one), with the final state."""


def _every(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def evaluate(
    exp: Experiment,
    state: TrainState,
    batches: Iterable,
    *,
    save_as: str | None = None,
    what: str = "the evaluation split",
) -> dict[str, float]:
    """The task's metrics over every batch of an evaluation split, weighted exactly.

    Sums are added on the device; per-example outputs (for metrics that are not sums) are
    gathered to the host and reported once the whole split is in. With `save_as` (a path
    stem), the task also writes its files about the evaluation there (process 0 only).
    """
    total, outputs = None, []
    for local_batch in batches:
        out = exp.eval_step(state.params, state.frozen, exp.global_batch(local_batch))
        if out.outputs:
            outputs.append(_to_host(out.outputs))
        out = out.summed()
        total = out if total is None else total + out
    if total is None:
        raise DataError(f"{what} is empty: there is nothing to evaluate; give it examples.")
    results = exp.task.report(jax.device_get(total))
    if outputs:
        gathered = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
        results.update(exp.task.report_outputs(gathered))
        if save_as and jax.process_index() == 0:
            exp.task.save_outputs(gathered, save_as)
    return results


def evaluate_split(exp: Experiment, state: TrainState, split: str, *, save_as=None) -> dict:
    """A split's metrics: the task's own evaluation if it has one (RL), else the loss over
    every batch of the split (`evaluate`)."""
    results = exp.task.evaluate(exp, state, split)
    if results is not None:
        return results
    batches = pipeline.eval_batches(
        exp.config,
        split,
        task=exp.task,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    what = f"the {split} split of data.source={exp.config.data.source!r}"
    return evaluate(exp, state, batches, save_as=save_as, what=what)


def _to_host(tree) -> dict[str, np.ndarray]:
    """Global per-example arrays as host numpy, gathered from every process if need be."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


class Evaluate(Hook):
    """Evaluates a whole split every `every` steps and after the last; logs it."""

    def __init__(self, split: str, every: int, *, at_start: bool = False):
        self.split, self.every, self.at_start = split, every, at_start
        self.ran_at: int | None = None

    def evaluate(self, loop, step: int, state: TrainState) -> None:
        stem = os.path.join(loop.workdir, "eval", self.split)
        loop.results[self.split] = evaluate_split(loop.exp, state, self.split, save_as=stem)
        loop.writer.write(step, self.split, loop.results[self.split])
        self.ran_at = step

    def on_start(self, loop, state, step) -> None:
        if self.at_start and step == 0:  # starting from weights: the baseline to beat
            self.evaluate(loop, 0, state)

    def due(self, step, *, last, preempted) -> bool:
        return last or _every(step, self.every)

    def run(self, loop, step, state) -> None:
        with saved_if_failing(loop, step, state):
            self.evaluate(loop, step, state)

    def on_end(self, loop, state, *, preempted) -> None:
        if not preempted and self.ran_at != loop.end_step:  # a finished run, resumed
            self.evaluate(loop, loop.end_step, state)


@contextlib.contextmanager
def saved_if_failing(loop, step: int, state: TrainState):
    """Runs an evaluation after step `step`; should it fail, saves that step first, as the
    Checkpoint hook after it would have (without the metrics it did not get), so the error
    ends the run without losing the steps trained since the last checkpoint."""
    try:
        yield
    except Exception:
        for hook in loop.hooks:
            if isinstance(hook, Checkpoint) and step not in hook.ckpts.steps():
                hook.run(loop, step, state)
                hook.ckpts.wait()
                if step in hook.ckpts.steps():  # not when the state was non-finite
                    console.status(
                        f"jtrain: the evaluation after step {step} failed; step {step} is saved "
                        f"in {hook.ckpts.directory}, where a run started again resumes"
                    )
        raise


def recorded_event(workdir: str, split: str) -> dict | None:
    """The last event of `split` in workdir/metrics.jsonl (None if none), the same on every
    process: process 0 reads it and tells the others whether there is one."""
    event = None
    if jax.process_index() == 0:
        events = metrics.read_metrics(workdir, missing_ok=True)
        event = next((e for e in reversed(events) if e.get("split") == split), None)
    if jax.process_count() > 1:
        found = multihost_utils.broadcast_one_to_all(np.int32(event is not None))
        if found and event is None:
            event = {}  # the others only need to know that there is one
    return event


class FinalEvaluate(Evaluate):
    """Evaluates a split once per run, at the end, on the final weights: the test split.

    A workdir whose metrics.jsonl already has the split's event (a finished run started again)
    is not evaluated a second time: touching the test split again would make it validation.
    """

    def __init__(self, split: str):
        super().__init__(split, every=0)

    def due(self, step, *, last, preempted) -> bool:
        return False

    def on_end(self, loop, state, *, preempted) -> None:
        if preempted:
            return
        done = recorded_event(loop.workdir, self.split)
        if done is None:
            self.evaluate(loop, loop.final_step, state)
            return
        console.status(already_evaluated(self.split, done))
        loop.results[self.split] = {k: v for k, v in done.items() if k not in ("step", "split")}


def already_evaluated(split: str, event: dict) -> str:
    return (
        f"jtrain: the {split} split of this run was already evaluated (step {event.get('step')}, "
        f"loss {event.get('loss')}; see metrics.jsonl) and is evaluated only once per run; "
        "not evaluated again. Train in a new workdir to test other weights."
    )


class GenerateEvaluate(Hook):
    """Completes a split's prompts with the sampler and scores them against their references
    (exact match, BLEU, chrF, ROUGE-L), every `every` steps and after the last; tasks without
    references (`Task.generation_set` is None) are skipped."""

    def __init__(self, split: str, every: int, settings):
        self.split, self.every, self.settings = split, every, settings
        self.sampler: Sampler | None = None

    def scores(self, exp: Experiment, state: TrainState) -> dict[str, float] | None:
        """The split's generation scores with the state's weights; None without references."""
        examples = exp.task.generation_set(self.split, self.settings.examples)
        if not examples or not examples.prompts:
            return None
        model = nnx.merge(exp.graphdef, state.model_params)
        if self.sampler is None:  # one sampler, so its compiled loop is reused every time
            self.sampler = Sampler(model)
        self.sampler.state = nnx.state(model)
        completions = self.sampler.generate(
            examples.prompts,
            max_new_tokens=self.settings.max_new_tokens,
            stop_ids=examples.stop_ids,
            temperature=self.settings.temperature,
            seed=exp.config.seed,
        )
        texts = [examples.decode(_without_stop(c).tolist()) for c in completions]
        return text_scores.score_all(texts, examples.references)

    def due(self, step, *, last, preempted) -> bool:
        return last or _every(step, self.every)

    def run(self, loop, step, state) -> None:
        with saved_if_failing(loop, step, state):
            scores = self.scores(loop.exp, state)
        if scores is not None:
            loop.writer.write(step, self.split, scores)
            loop.results.setdefault(self.split, {}).update(scores)


def _without_stop(completion) -> np.ndarray:
    return completion.tokens[:-1] if completion.finish_reason == "stop" else completion.tokens


class Checkpoint(Hook):
    """Saves the state and the batch source's position every `every` steps, after the last
    and when preempted; records the validation loss for keeping the best."""

    def __init__(self, ckpts: checkpoint.Checkpoints, every: int, val: Evaluate | None):
        self.ckpts, self.every, self.val = ckpts, every, val

    def due(self, step, *, last, preempted) -> bool:
        return last or preempted or _every(step, self.every)

    def run(self, loop, step, state) -> None:
        evaluated = self.val is not None and self.val.ran_at == step
        self.ckpts.save(
            state.checkpointed(),  # frozen parts are rebuilt, not saved
            data_state=loop.batches.get_state(),
            config=loop.config.to_dict(),
            metrics=loop.results.get(self.val.split) if evaluated else None,
            started=loop.started,
        )

    def on_end(self, loop, state, *, preempted) -> None:
        self.ckpts.wait()


class TrainLog(Hook):
    """Logs the task's train metrics, throughput and MFU every `every` steps and the last
    (train.steps, or the step an early stop ended the run at)."""

    def __init__(self, every: int, last: int):
        self.every, self.last = every, last
        self._unlogged = None  # (step, device metrics) of the latest step not logged

    def on_step(self, loop, step, step_metrics) -> None:
        if not (_every(step, self.every) or step == self.last):
            self._unlogged = (step, step_metrics)  # a reference: no device sync
            return
        self._unlogged = None
        self._write(loop, step, step_metrics, throughput=loop.throughput.report(step))

    def _write(self, loop, step: int, step_metrics, *, throughput: dict) -> None:
        host = jax.device_get(step_metrics)
        values = loop.exp.task.report(host["totals"])
        values.update({k: float(v) for k, v in host.items() if k != "totals"})
        values.update(throughput)
        loop.writer.write(step, "train", values)
        loop.results["train"] = values

    def on_end(self, loop, state, *, preempted) -> None:
        if preempted:
            return
        if self._unlogged is not None and self._unlogged[0] == loop.end_step:
            # Stopped early between logs; evaluation ran since, so no throughput figure.
            self._write(loop, *self._unlogged, throughput={})
        wall_time = time.perf_counter() - loop.started
        loop.writer.write(loop.end_step, "train", {"wall_time": wall_time})


class Display(Hook):
    """Shows what the finished run produced (`Task.show`: an LM's sample)."""

    def on_end(self, loop, state, *, preempted) -> None:
        if not preempted:
            loop.exp.task.show(nnx.merge(loop.exp.graphdef, state.model_params))
