"""The training loop: resume, step, log, validate, checkpoint, test once at the end.

The loop never waits on the device without need: step n's metrics are read only after
step n+1 has been dispatched, so the device always has queued work.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jtrain import checkpoint, generate, metrics, pretrained
from jtrain import config as config_lib
from jtrain.data import pipeline, tokenizers
from jtrain.experiment import Experiment
from jtrain.state import TrainState
from jtrain.tasks.base import Task

MODES = ("train",)


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient under train.on_nonfinite='halt'."""


class _Throughput:
    """Tokens/s, step time and MFU over the steps since the last report."""

    def __init__(self, exp: Experiment, tokens_per_step: int):
        cfg = exp.config
        self.tokens_per_step = tokens_per_step
        # A LoRA run's frozen base gets no weight gradients: fewer FLOPs per token.
        self.flops_per_token = exp.task.flops_per_token(
            cfg.train.seq_len, weight_grads=not exp.has_frozen()
        )
        self.num_devices = exp.mesh.size
        self.peak = metrics.device_peak_flops(
            exp.mesh.devices.flat[0], cfg.metrics.peak_flops_per_device
        )
        self.restart(0)

    def restart(self, step: int) -> None:
        """Starts a new interval (after compilation or evaluation, which it must not count)."""
        self.step, self.time = step, time.perf_counter()

    def report(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps, seconds = step - self.step, now - self.time
        self.restart(step)
        if steps <= 0 or seconds <= 0:
            return {}
        tokens_per_s = steps * self.tokens_per_step / seconds
        return {
            "step_time": seconds / steps,
            "tokens_per_s": tokens_per_s,
            "mfu": metrics.mfu(self.flops_per_token, tokens_per_s, self.num_devices, self.peak),
        }


class _Preemption:
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


def _barrier(name: str) -> None:
    """Waits for every process of a multi-process run to get here."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _initial_state(
    exp: Experiment, ckpts: checkpoint.Checkpoints, train_iter, config
) -> tuple[TrainState, int]:
    """The latest good checkpoint (with the data position), else a fresh or init_from state.

    Checkpoints hold all but the frozen base of a LoRA run, which is rebuilt here exactly as
    the run first built it: from model.init_from, or else from the seed.
    """
    init_from = config.model.init_from
    restored = ckpts.restore_latest(exp.abstract_sharded_state().checkpointed())
    if restored is not None:
        state, data_state, step = restored
        train_iter.set_state(data_state)
        frozen = exp.rebuild_frozen()  # a LoRA run's base; empty when every weight trains
        print(f"jtrain: resumed from {ckpts.directory} at step {step}", flush=True)
        return state.replace(frozen=frozen), step
    base = pretrained.load(init_from, exp.abstract_base) if init_from else None
    state = exp.init_state(base=base)
    if init_from:
        print(f"jtrain: parameters initialised from {init_from}", flush=True)
    return state, 0


@dataclasses.dataclass
class _Loop:
    """A run's bookkeeping around the pure step: logging, evaluation, checkpoints, policy."""

    config: ml_collections.ConfigDict
    exp: Experiment
    ckpts: checkpoint.Checkpoints
    train_iter: Any
    writer: metrics.MetricWriter
    started: float
    results: dict[str, dict] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        t = self.config.train
        self.throughput = _Throughput(self.exp, t.batch_size * t.seq_len)

    def evaluate(self, step: int, split: str, params) -> None:
        """Evaluates on a whole split and logs it."""
        batches = pipeline.eval_batches(
            self.config,
            split,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        self.results[split] = self.exp.evaluate(params, batches)
        self.writer.write(step, split, self.results[split])

    def save(self, state: TrainState, val: dict | None) -> None:
        """Starts an async checkpoint of the state and the data position after it."""
        self.ckpts.save(
            state.checkpointed(),  # a LoRA run's frozen base is rebuilt, not saved
            data_state=self.train_iter.get_state(),
            config=self.config.to_dict(),
            metrics=val,
            started=self.started,
        )

    def finish_step(self, step: int, step_metrics) -> None:
        """Applies the non-finite policy to a finished step and logs it when due."""
        if float(step_metrics["nonfinite"]):
            steps = self.ckpts.steps()
            last = f"step {steps[-1]} in {self.ckpts.directory}" if steps else "none yet"
            if self.config.train.on_nonfinite == "halt":
                self.ckpts.wait()
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {step}; its update was not applied. "
                    f"Last good checkpoint: {last}. Lower optimizer.lr, check the data, or set "
                    "--config.train.on_nonfinite=skip to drop such steps and go on."
                )
            print(f"warning: non-finite loss or gradient at step {step}; update skipped")
        if step % self.config.train.log_every == 0 or step == self.config.train.steps:
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            values.update(self.throughput.report(step))
            self.writer.write(step, "train", values)
            self.results["train"] = values

    def train(
        self, state: TrainState, first_step: int, preemption: _Preemption
    ) -> tuple[TrainState, bool]:
        """Runs steps first_step+1 .. train.steps; returns the state and whether preempted."""
        t, every_eval, every_ckpt = (
            self.config.train,
            self.config.eval.every_steps,
            self.config.checkpoint.every_steps,
        )
        previous = None  # (step, metrics): read once the next step is dispatched
        for step in range(first_step + 1, t.steps + 1):
            state, step_metrics = self.exp.train_step(
                state, self.exp.global_batch(next(self.train_iter))
            )
            if previous is not None:
                self.finish_step(*previous)
            previous = (step, step_metrics)
            if step == first_step + 1:
                jax.block_until_ready(step_metrics)  # compilation is not throughput
                compile_time = time.perf_counter() - self.started
                self.writer.write(step, "train", {"compile_time": compile_time})
                self.throughput.restart(step)

            do_eval = step == t.steps or (every_eval and step % every_eval == 0)
            do_save = step == t.steps or (every_ckpt and step % every_ckpt == 0)
            preempted = preemption.reached(step)
            if not (do_eval or do_save or preempted):
                continue
            self.finish_step(*previous)
            previous = None
            if do_eval:
                self.evaluate(step, "val", state.model_params)
            if do_save or preempted:
                self.save(state, self.results.get("val") if do_eval else None)
            self.throughput.restart(step)  # evaluation and saving are not throughput
            if preempted:
                self.ckpts.wait()
                print(f"jtrain: preempted; saved step {step} in {self.ckpts.directory}", flush=True)
                return state, True
        return state, False


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, task: Task | None = None
) -> dict[str, dict]:
    """Trains per `config` in workdir, resuming from its checkpoints if it has any.

    Writes config.json, metrics.jsonl, TensorBoard events and checkpoints to workdir and
    returns the last {"train": ..., "val": ..., "test": ...} metrics. `task` overrides the
    objective that `config.task` names.
    """
    started = time.perf_counter()
    for change in config_lib.prepare(config):
        print(f"jtrain: from {config.model.init_from}: {change}", flush=True)
    os.makedirs(workdir, exist_ok=True)
    checkpoint.prepare_workdir(workdir, config.to_dict(), overwrite=config.checkpoint.overwrite)
    _barrier("workdir checked")  # every process read the old config.json before it changes
    if jax.process_index() == 0:
        config_lib.save_json(config, workdir)

    exp = Experiment.from_config(config, task=task)
    ckpts = checkpoint.Checkpoints(workdir, config.checkpoint)
    train_iter = pipeline.make_train_iterator(
        config, process_index=jax.process_index(), process_count=jax.process_count()
    )
    state, first_step = _initial_state(exp, ckpts, train_iter, config)
    t = config.train
    print(
        f"jtrain: {exp.param_count():,} trained parameters"
        + (f" on a frozen base of {exp.frozen_count():,}" if exp.has_frozen() else "")
        + f", mesh {dict(exp.mesh.shape)}, "
        f"steps {first_step + 1}..{t.steps} of {t.batch_size}x{t.seq_len} tokens",
        flush=True,
    )
    with metrics.MetricWriter(workdir) as writer, _Preemption() as preemption:
        loop = _Loop(config, exp, ckpts, train_iter, writer, started)
        if first_step == 0 and config.model.init_from:
            # Fine-tuning: the starting point's validation loss is the baseline to beat.
            loop.evaluate(0, "val", state.model_params)
        state, preempted = loop.train(state, first_step, preemption)
        ckpts.wait()
        if not preempted:
            if first_step == t.steps:
                loop.evaluate(t.steps, "val", state.model_params)  # a finished run, resumed
            loop.evaluate(t.steps, "test", state.model_params)  # the test split: once, at the end
            writer.write(t.steps, "train", {"wall_time": time.perf_counter() - started})
    ckpts.close()
    if config.eval.sample_tokens and not preempted:
        _print_sample(exp, state.model_params, config)
    return loop.results


def _print_sample(exp: Experiment, params, config) -> None:
    tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
    prompt = config.eval.sample_prompt
    stop_id = tokenizer.eos_id
    if config.task == "sft":  # the prompt as a user turn, answered as the template's assistant
        from jtrain.data import chat

        template = chat.load(config.data.chat_template, config.data.tokenizer)
        ids, stop_id = chat.prompt_ids(template, tokenizer, prompt), template.stop_id
        prompt += "\n-> "
    else:
        ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    temperature = config.eval.sample_temperature
    new = generate.sample(
        exp.graphdef,
        params,
        np.asarray(ids),
        max_new_tokens=config.eval.sample_tokens,
        window=config.train.seq_len,
        stop_id=stop_id,
        temperature=temperature,
        seed=config.seed,
    )
    how = f"temperature {temperature}" if temperature else "greedy"
    print(f"sample ({how}):\n{prompt}{tokenizer.decode(new)}", flush=True)
