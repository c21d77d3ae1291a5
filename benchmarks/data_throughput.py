"""Input pipeline throughput against the train step that consumes it, on the same machine.

Two questions, one process, the default config unless told otherwise:

1. Is the pipeline fast enough? Batches per second of `pipeline.make_train_iterator` alone
   (packed rows, background prefetch, in-process and with Grain worker processes), as
   tokens/s of the batch shape, against the tokens/s of jtrain's compiled train step
   (`Experiment.train_step` on a fixed batch). Target: pipeline / step >= 5.
2. Does feeding it cost the step anything? The same train step run from the live iterator
   (next() -> global_batch -> train_step, as jtrain.run does) and from a list of the same
   batches materialised in memory beforehand. Both sides start from the same parameters and
   see the same batches, so their losses must agree exactly; timed blocks of
   `--steps_per_round` steps alternate between the sides (A B, B A, ...), each ending in
   `jax.block_until_ready`, so load from other processes hits both alike; the figure is the
   median over rounds of the two adjacent blocks' time ratio. Target: <= 1.02.

Run from the repository root (no install needed):

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --config configs/tiny.py --rounds 4

It always exits 0; a ratio that misses its target is marked FAIL in the output.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` and `configs` without installing

import jax  # noqa: E402

import jtrain.config  # noqa: E402
from jtrain.data import pipeline  # noqa: E402
from jtrain.experiment import Experiment  # noqa: E402

THROUGHPUT_TARGET = 5.0
END_TO_END_TARGET = 1.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; config values not given keep the config file's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "default.py"))
    p.add_argument("--workers", default="0,2", help="comma-separated data.workers to measure")
    p.add_argument("--batches", type=int, default=500, help="timed batches per pipeline run")
    p.add_argument("--steps", type=int, default=10, help="timed steps for the step's tokens/s")
    p.add_argument("--rounds", type=int, default=12, help="timed blocks per end-to-end side")
    p.add_argument("--steps_per_round", type=int, default=3, help="steps in each timed block")
    args = p.parse_args(argv)
    for name in ("batches", "steps", "rounds", "steps_per_round"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    args.workers = [int(w) for w in args.workers.split(",")]
    return args


def pipeline_tokens_per_s(config, workers: int, batches: int) -> tuple[float, float, float]:
    """Returns (tokens/s, first-batch seconds, fraction of target tokens with mask 1)."""
    config.data.workers = workers
    start = time.perf_counter()
    iterator = pipeline.make_train_iterator(config)
    next(iterator)  # worker start-up and the first epoch plan are not throughput
    first = time.perf_counter() - start
    masked, total = 0.0, 0
    start = time.perf_counter()
    for batch in itertools.islice(iterator, batches):
        masked += float(batch["loss_weight"].sum())
        total += batch["loss_weight"].size
    seconds = time.perf_counter() - start
    iterator.close()
    return total / seconds, first, masked / total


def step_tokens_per_s(exp: Experiment, batch: dict, steps: int) -> tuple[float, float]:
    """Returns (tokens/s, seconds/step) of the compiled train step on a fixed batch.

    Each step is timed alone and the fastest counts: other load on the machine only slows
    steps down, and a faster step makes the pipeline/step ratio harder to meet.
    """
    state = exp.init_state()
    global_batch = exp.global_batch(batch)
    for _ in range(2):  # compile and warm up
        state, metrics = exp.train_step(state, global_batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = exp.train_step(state, global_batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return batch["inputs"].size / min(times), min(times)


class Side:
    """One end-to-end side: its own TrainState and a source of local batches."""

    def __init__(self, name: str, exp: Experiment, batches):
        self.name, self.exp, self.batches = name, exp, batches
        self.state = exp.init_state()
        self.losses: list[float] = []
        self.times: list[float] = []

    def run(self, steps: int) -> None:
        start = time.perf_counter()
        pending = []
        for _ in range(steps):
            self.state, metrics = self.exp.train_step(
                self.state, self.exp.global_batch(next(self.batches))
            )
            pending.append(metrics["loss"])
        jax.block_until_ready(self.state)
        self.times.append((time.perf_counter() - start) / steps)
        self.losses.extend(float(x) for x in pending)


def end_to_end(config, exp: Experiment, rounds: int, steps_per_round: int):
    """Alternates pipeline-fed and memory-fed blocks; returns the two sides."""
    total = (rounds + 1) * steps_per_round  # one untimed warm-up round each
    memory = list(itertools.islice(pipeline.make_train_iterator(config), total))
    live = Side("pipeline", exp, pipeline.make_train_iterator(config))
    held = Side("in-memory", exp, iter(memory))
    live.run(steps_per_round)
    held.run(steps_per_round)
    live.times.clear()
    held.times.clear()
    for r in range(rounds):
        for side in (live, held) if r % 2 == 0 else (held, live):
            side.run(steps_per_round)
    return live, held


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = jtrain.config.load(args.config)
    jtrain.config.validate(config)
    d, t = config.data, config.train
    print("data_throughput: input pipeline vs the train step it feeds", flush=True)
    print(f"device           : {jax.devices()[0].platform} x {jax.device_count()}")
    print(f"config           : {os.path.relpath(args.config, REPO_ROOT)}")
    print(
        f"data             : source={d.source!r} tokenizer={d.tokenizer!r} "
        f"packing={d.packing} prefetch={d.prefetch}"
    )
    print(f"batch            : {t.batch_size} x {t.seq_len} = {t.batch_size * t.seq_len:,} tokens")

    exp = Experiment.from_config(config)
    batch = next(pipeline.make_train_iterator(config))
    step_rate, step_seconds = step_tokens_per_s(exp, batch, args.steps)
    print(f"train step       : {step_seconds * 1e3:.1f} ms/step, {step_rate:,.0f} tokens/s")

    print("\npipeline alone   :   tokens/s   first batch   mask=1   pipeline/step")
    ratios, rates = [], []
    for workers in args.workers:
        rate, first, filled = pipeline_tokens_per_s(config, workers, args.batches)
        ratios.append(rate / step_rate)
        rates.append(rate)
        print(
            f"  workers={workers:<7}: {rate:>10,.0f}   {first:>9.2f} s   {filled:6.1%}"
            f"   {ratios[-1]:>12,.1f}"
        )
    config.data.workers = 0
    # Even if none of it overlapped with the step, building a batch in-process costs this much.
    in_process = rates[args.workers.index(0)] if 0 in args.workers else max(rates)
    build = t.batch_size * t.seq_len / in_process
    print(
        f"batch build time : {build * 1e3:.2f} ms = {build / step_seconds:.2%} of a step "
        f"(the most the pipeline can add, before prefetch hides it)"
    )

    live, held = end_to_end(config, exp, args.rounds, args.steps_per_round)
    same = live.losses == held.losses
    print(
        f"\nend to end       : {args.rounds} rounds x {args.steps_per_round} steps per side, "
        f"losses identical: {'yes' if same else 'NO'}"
    )
    print("          ms/step median   ms/step min   per block (ms)")
    for side in (live, held):
        blocks = " ".join(f"{x * 1e3:.1f}" for x in side.times)
        print(
            f"{side.name:<10} {statistics.median(side.times) * 1e3:>13.1f}"
            f" {min(side.times) * 1e3:>13.1f}   {blocks}"
        )
    # Blocks of a round run back to back, so their ratio cancels load that drifts slowly.
    paired = [a / b for a, b in zip(live.times, held.times, strict=True)]
    ratio = statistics.median(paired)
    verdict = "OK" if ratio <= END_TO_END_TARGET and same else "FAIL"
    print("per-round ratio  : " + " ".join(f"{x:.3f}" for x in paired))
    medians = statistics.median(live.times) / statistics.median(held.times)
    print(f"ratio of medians pipeline/in-memory = {medians:.3f}")
    print(
        f"RATIO pipeline/in-memory step time = {ratio:.3f} (median of per-round ratios; "
        f"target <= {END_TO_END_TARGET}) {verdict}"
    )
    verdict = "OK" if min(ratios) >= THROUGHPUT_TARGET else "FAIL"
    print(
        f"RATIO pipeline/step tokens/s = {min(ratios):,.1f} (lowest of workers="
        f"{args.workers}; target >= {THROUGHPUT_TARGET}) {verdict}"
    )


if __name__ == "__main__":
    main()
