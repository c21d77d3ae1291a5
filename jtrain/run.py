"""Running a config: `train_and_evaluate` (train, validate, test once, show) and `evaluate`
(one split of a saved or pre-trained model, without training). Both are what `jtrain.main`'s
`--mode` calls; the steps and the hooks around them live in `jtrain.loop` and `jtrain.hooks`.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections

from jtrain import (
    atomic,
    checkpoint,
    console,
    early_stopping,
    frozen_sources,
    hooks,
    metrics,
    plot_hook,
    profiling,
    progress,
    runs,
    tb_config,
    wandb_sink,
    workdir_claim,
)
from jtrain import config as config_lib
from jtrain import preemption as preemption_lib
from jtrain.data import pipeline, splits
from jtrain.drift import hook as drift_hook
from jtrain.experiment import Experiment
from jtrain.loop import BatchSource, Loop, NonFiniteError, PipelineBatches
from jtrain.state import TrainState
from jtrain.tasks.base import Task

MODES = ("train", "eval")
__all__ = ["MODES", "NonFiniteError", "evaluate", "train_and_evaluate"]


def _pipeline_batches(exp: Experiment) -> PipelineBatches:
    iterator = pipeline.make_train_iterator(
        exp.config,
        task=exp.task,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return PipelineBatches(iterator, exp)


def _initial_state(
    exp: Experiment, ckpts: checkpoint.Checkpoints, batches: BatchSource
) -> tuple[TrainState, int]:
    """The latest good checkpoint (with the data position), else a fresh or init_from state.

    Checkpoints hold all but the frozen parts, which are rebuilt here exactly as the run first
    built them: each from its own spec (a LoRA base from model.init_from), else from the seed.
    """
    init_from = exp.config.model.init_from
    restored = ckpts.restore_latest(exp.abstract_sharded_state().checkpointed())
    if restored is not None:
        state, data_state, step = restored
        batches.set_state(data_state)
        console.status(f"jtrain: resumed from {ckpts.directory} at step {step}")
        return state.replace(frozen=exp.rebuild_frozen()), step
    state = exp.init_state(base=exp.load_base())
    if init_from:
        console.status(f"jtrain: parameters initialised from {init_from}")
    return state, 0


def _prepare(config: ml_collections.ConfigDict) -> None:
    for change in config_lib.prepare(config):
        console.status(f"jtrain: from {config.model.init_from}: {change}")


def _hooks(exp: Experiment, ckpts: checkpoint.Checkpoints) -> list[hooks.Hook]:
    c = exp.config
    val = hooks.Evaluate("val", c.eval.every_steps, at_start=bool(c.model.init_from))
    generate = hooks.GenerateEvaluate("val", c.eval.every_steps, c.eval.generate)
    stopping = early_stopping.Settings.from_config(c)
    return [
        progress.Progress(c.train.steps),  # first: it notes a step before its log line
        val,
        *([generate] if c.eval.generate.examples else []),
        *([early_stopping.EarlyStopping(stopping, val, ckpts)] if stopping else []),
        hooks.Checkpoint(ckpts, c.checkpoint.every_steps, val),
        hooks.FinalEvaluate("test"),  # the test split: once, at the end
        hooks.TrainLog(c.train.log_every, c.train.steps),
        hooks.Display(),
        tb_config.ConfigSummary(),  # the config in TensorBoard's Text and HParams tabs
        *profiling.hooks(c),  # profile.steps > 0: a trace of those steps
        *drift_hook.hooks(c),  # the train split's drift profile (drift/), from the final weights
        plot_hook.Plots(),  # last: plots/ from every event the others logged
    ]


def _save_artifacts(exp: Experiment, workdir: str) -> None:
    """Makes the task's files (every process: a task may compute them on the devices), or
    keeps those the workdir has where the task finds them still right; process 0 writes."""
    previous = runs.saved_artifacts(workdir, exp.task)
    files = exp.task.artifacts(exp, previous)
    if jax.process_index() == 0:
        for name, content in files.items():
            if content != previous.get(name):
                atomic.write_json(os.path.join(workdir, name), content)


def _mark_resume(writer: metrics.MetricWriter, workdir: str, step: int) -> None:
    """Logs a `resume` event where a run resumes: the steps logged after `step` before it
    (trained, then lost to a kill) are logged again after this line, and these supersede."""
    if not step or jax.process_index() != 0:
        return
    logged = [e["step"] for e in metrics.read_metrics(workdir, missing_ok=True)]
    writer.write(step, "resume", {"redone_steps": max([step, *logged]) - step})


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, task: Task | None = None
) -> dict[str, dict]:
    """Trains per `config` in workdir, resuming from its checkpoints if it has any.

    Writes config.json, metrics.jsonl, TensorBoard events and checkpoints to workdir and
    returns the last {"train": ..., "val": ..., "test": ...} metrics. `task` overrides the
    objective that `config.task` names.
    """
    started = time.perf_counter()
    _prepare(config)
    wandb_sink.check(config)  # a missing wandb package fails now, not after compiling
    with workdir_claim.claimed(workdir, config, task=task):  # refuses, or holds it to the end
        if jax.process_index() == 0:
            config_lib.save_json(config, workdir)
        return _train(config, workdir, task, started)


def _train(
    config: ml_collections.ConfigDict, workdir: str, task: Task | None, started: float
) -> dict[str, dict]:
    """train_and_evaluate in a workdir this run holds."""
    exp = Experiment.from_config(config, task=task)
    splits.check_not_empty(config, exp.task)  # an empty val or test would end the run at last
    _save_artifacts(exp, workdir)  # before the state: a task may load a model to make them
    stopping = early_stopping.Settings.from_config(config)
    metric, mode = (stopping.metric, stopping.mode) if stopping else exp.task.selection_metric
    best = {"best_metric": metric, "best_mode": mode}
    ckpts = checkpoint.Checkpoints(workdir, config.checkpoint, **best)
    frozen_sources.pin(exp, workdir, has_checkpoints=bool(ckpts.steps()))
    batches = exp.task.batch_source(exp, workdir) or _pipeline_batches(exp)
    state, first_step = _initial_state(exp, ckpts, batches)
    t = config.train
    console.status(
        f"jtrain: {exp.param_count():,} trained parameters"
        + (f", {exp.frozen_count():,} frozen" if exp.frozen_count() else "")
        + f", mesh {dict(exp.mesh.shape)}, "
        f"steps {first_step + 1}..{t.steps} of {t.batch_size} examples"
    )
    # Signals are handled until the last file is closed: a Ctrl-C while closing quits quietly.
    with preemption_lib.Preemption() as preemption:
        sinks = wandb_sink.sinks(config, workdir, first_step)
        with metrics.MetricWriter(workdir, sinks=sinks) as writer:
            _mark_resume(writer, workdir, first_step)
            loop = Loop(config, exp, batches, _hooks(exp, ckpts), writer, ckpts, started)
            with profiling.stopped_on_exit(loop.hooks):  # a failed run's trace, too
                loop.run(state, first_step, preemption)
        ckpts.close()
    return loop.results


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step: int | None = None,
    task: Task | None = None,
) -> dict[str, float]:
    """Evaluates `eval.split` of the workdir's checkpoint at `step` (None = the latest), or of
    the `model.init_from` weights when the workdir has no checkpoint; appends the event to
    workdir/metrics.jsonl and returns the metrics. Nothing is trained or saved."""
    _prepare(config)
    with workdir_claim.claimed(workdir, config, task=task, training=False):
        return _evaluate(config, workdir, step, task)


def _evaluate(
    config: ml_collections.ConfigDict, workdir: str, step: int | None, task: Task | None
) -> dict[str, float]:
    """evaluate in a workdir this run holds (it appends to metrics.jsonl, as training does)."""
    split = config.eval.split
    done = hooks.recorded_event(workdir, "test") if split == "test" else None
    if done is not None:  # the test split is touched once per run
        console.status(hooks.already_evaluated(split, done))
        return {k: v for k, v in done.items() if k not in ("step", "split")}
    exp = Experiment.from_config(config, task=task)
    exp.task.artifacts(exp, runs.saved_artifacts(workdir, exp.task))  # used, never saved here
    state, at = _evaluated_state(exp, workdir, step)
    results = hooks.evaluate_split(exp, state, split, save_as=os.path.join(workdir, "eval", split))
    if config.eval.generate.examples:
        generate = hooks.GenerateEvaluate(split, 0, config.eval.generate)
        results.update(generate.scores(exp, state) or {})
    with metrics.MetricWriter(workdir) as writer:
        writer.write(at, split, results)
    return results


def _evaluated_state(exp: Experiment, workdir: str, step: int | None) -> tuple[TrainState, int]:
    """(state, its step): a checkpoint of workdir, else the model.init_from weights."""
    init_from = exp.config.model.init_from
    restored = None
    step = early_stopping.final_step(workdir) if step is None else step
    frozen_sources.apply(exp, frozen_sources.read(workdir) or {}, workdir)
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        ckpts = checkpoint.Checkpoints(workdir, exp.config.checkpoint, read_only=True)
        try:
            abstract = exp.abstract_sharded_state().checkpointed()
            restored = ckpts.restore_latest(abstract, step=step)
        finally:
            ckpts.close()
    if restored is not None:
        state, _, at = restored
        return state.replace(frozen=exp.rebuild_frozen()), at
    if step is not None or not init_from:
        raise checkpoint.CheckpointError(
            f"nothing to evaluate: {workdir} has no checkpoint"
            + (f" of step {step}" if step is not None else "")
            + "; train there first, or set --config.model.init_from to the weights to evaluate."
        )
    return exp.init_state(base=exp.load_base()), 0
