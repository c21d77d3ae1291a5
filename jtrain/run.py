"""The training loop: step, log, evaluate on validation, test once at the end.

The loop never waits on the device without need: step n's metrics are read only after
step n+1 has been dispatched, so the device always has queued work.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from jtrain import config as config_lib
from jtrain import generate, metrics
from jtrain.data import pipeline, tokenizers
from jtrain.experiment import Experiment

MODES = ("train",)


class _Throughput:
    """Tokens/s, step time and MFU over the steps since the last report."""

    def __init__(self, exp: Experiment, tokens_per_step: int):
        cfg = exp.config
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = exp.task.flops_per_token(cfg.train.seq_len)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """Trains per `config`, writing config.json, metrics.jsonl and TensorBoard to workdir.

    Returns the final {"train": ..., "val": ..., "test": ...} metrics.
    """
    config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    config_lib.save_json(config, workdir)
    start = time.perf_counter()

    exp = Experiment.from_config(config)
    state = exp.init_state()
    t = config.train
    print(
        f"jtrain: {exp.param_count():,} parameters, mesh {dict(exp.mesh.shape)}, "
        f"{t.steps} steps of {t.batch_size}x{t.seq_len} tokens",
        flush=True,
    )
    train_iter = pipeline.make_train_iterator(
        config, process_index=jax.process_index(), process_count=jax.process_count()
    )
    throughput = _Throughput(exp, t.batch_size * t.seq_len)
    results: dict[str, dict] = {}

    with metrics.MetricWriter(workdir) as writer:

        def log_train(step: int, device_metrics) -> None:
            values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            values.update(throughput.report(step))
            writer.write(step, "train", values)
            results["train"] = values

        def evaluate(step: int, split: str, params) -> None:
            batches = pipeline.eval_batches(
                config,
                split,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            results[split] = exp.evaluate(params, batches)
            writer.write(step, split, results[split])

        pending = None  # (step, metrics) logged once the next step is dispatched
        for step in range(1, t.steps + 1):
            batch = exp.global_batch(next(train_iter))
            state, step_metrics = exp.train_step(state, batch)
            if pending is not None:
                log_train(*pending)
                pending = None
            if step == 1:
                jax.block_until_ready(step_metrics)  # compilation is not throughput
                writer.write(1, "train", {"compile_time": time.perf_counter() - start})
                throughput.restart(1)
            if step % t.log_every == 0 or step == t.steps:
                pending = (step, step_metrics)
            every = config.eval.every_steps
            if step == t.steps or (every and step % every == 0):
                if pending is not None:
                    log_train(*pending)
                    pending = None
                evaluate(step, "val", state.params)
                throughput.restart(step)

        evaluate(
            t.steps, "test", state.params
        )  # the test split is touched exactly once, at the end
        writer.write(t.steps, "train", {"wall_time": time.perf_counter() - start})

    if config.eval.sample_tokens:
        _print_sample(exp, state.params, config)
    return results


def _print_sample(exp: Experiment, params, config) -> None:
    tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
    prompt = config.eval.sample_prompt
    ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    new = generate.sample(
        exp.graphdef,
        params,
        np.asarray(ids),
        max_new_tokens=config.eval.sample_tokens,
        window=config.train.seq_len,
        stop_id=tokenizer.eos_id,
        temperature=config.eval.sample_temperature,
        seed=config.seed,
    )
    how = (
        f"temperature {config.eval.sample_temperature}"
        if config.eval.sample_temperature
        else "greedy"
    )
    print(f"sample ({how}):\n{prompt}{tokenizer.decode(new)}", flush=True)
