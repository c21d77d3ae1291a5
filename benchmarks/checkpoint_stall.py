"""Cost of jtrain's async checkpointing: training steps with saving against steps without.

One model (the config's), one optimizer, one fixed batch, one device, one process. The
training loop of jtrain/run.py is replayed in two modes on the same train state:

- never: dispatch `exp.train_step`, then read the previous step's `nonfinite` flag (as the
  loop's `finish_step` does), and nothing else.
- save: the same, and every `--every` steps also read the current step's flag and call
  `Checkpoints(tmpdir, config.checkpoint).save(state, data_state=..., config=..., ...)` as
  the loop does: async, with a small data-state dict, the config dict and no metrics (the
  loop passes metrics only when it has just validated). `checkpoint.keep` and `keep_best`
  stay at the config's values, so the run's retention policy applies; the report counts
  the checkpoints it leaves on disk.

Timed rounds of the two modes alternate (A B, B A, ...) so load from other processes hits
both alike. Each round starts from a fresh temporary directory and ends with
`jax.block_until_ready(state)` and, when saving, `Checkpoints.wait()`: a save's background
work counts against the round it was started in instead of being left to the next. Saves
fall on the round's steps 1, 1 + every, ..., so with `--every N > 1` each save's background
write overlaps the N - 1 steps after it, as in a run. The report gives median per-step
times, the ratio save/never (target <= 1.10 with saving every step), where the saving time
goes (Orbax's own duration events), the process CPU time each save adds (less sensitive to
load from other processes than wall time: on few cores, a save's background CPU work is
what slows the steps), the checkpoints left on disk, and the throughput and CPU time of one
blocking save (save + wait, no training alongside) and of `restore_latest`.

Run from the repository root (no install needed):

    python benchmarks/checkpoint_stall.py
    python benchmarks/checkpoint_stall.py --every 100 --rounds 2  # ~7 min on 2 CPU cores
    python benchmarks/checkpoint_stall.py --config configs/tiny.py --rounds 3

It always exits 0; a ratio above the target is marked FAIL in the output.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` and `configs` without installing

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import jtrain.config  # noqa: E402
from jtrain.checkpoint import Checkpoints  # noqa: E402
from jtrain.data import pipeline  # noqa: E402
from jtrain.experiment import Experiment  # noqa: E402

TARGET = 1.10  # applies to saving every step; less frequent saving must do at least as well
# Orbax's own duration events (jax.monitoring) that say where a save's time goes, per save.
BLOCKING_EVENTS = {  # in the training thread, inside Checkpoints.save
    "all blocking Orbax work": "/jax/checkpoint/write/async/blocking_duration_secs",
    "  waiting for the previous save": "/jax/orbax/write/blocking_wait_prev_duration_secs",
    "  pytree handling (tree_map)": "/jax/orbax/write/blocking_tree_map_duration_secs",
    "  device-to-host copy": "/jax/orbax/write/blocking_d2h_duration_secs",
}
BACKGROUND_EVENTS = {  # in Orbax's threads, overlapping the next steps
    "all background work (parts overlap)": "/jax/orbax/write/background_duration_secs",
    "  tensorstore array writes": "/jax/orbax/write/background_ts_duration_secs",
    "  step directory creation": "/jax/orbax/write/background_directory_creation_secs",
    "  finalize (metadata, rename)": "/jax/orbax/write/background_finalize_secs",
    "  ocdbt merge": "/jax/orbax/write/background_ocdbt_merge_secs",
    "  removing old steps": "/jax/checkpoint/write/remove_steps_duration_secs",
}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; config values not given keep the config file's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "default.py"))
    p.add_argument("--every", default="1,10", help="save every N steps; comma-separated Ns")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps and saves (>= 1)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds per mode and N")
    p.add_argument(
        "--steps_per_round", type=int, default=5, help="steps per round, raised to a multiple of N"
    )
    p.add_argument("--io_repeats", type=int, default=3, help="blocking saves and restores timed")
    args = p.parse_args(argv)
    for name in ("warmup", "rounds", "steps_per_round", "io_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    try:
        args.every = [int(n) for n in args.every.split(",")]
    except ValueError:
        p.error(f"--every must be comma-separated integers, got {args.every!r}")
    if min(args.every) < 1:
        p.error("--every values must be >= 1")
    return args


class EventLog:
    """Totals of Orbax's save duration events (jax.monitoring), while `active`."""

    def __init__(self):
        self.active = False
        self.totals: dict[str, float] = collections.defaultdict(float)
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, seconds: float, **kwargs) -> None:
        if self.active:
            self.totals[event] += seconds


class Loop:
    """The training loop's step/save pattern on one Experiment and one train state."""

    def __init__(self, config):
        self.config = config
        self.config_dict = config.to_dict()
        self.exp = Experiment.from_config(config, devices=jax.devices()[:1])
        self.state = self.exp.init_state()
        self.batch = self.exp.global_batch(next(iter(pipeline.make_train_iterator(config))))
        self.save_call_s: list[float] = []  # time in Checkpoints.save, per call
        self.wait_s: list[float] = []  # time in the round-ending Checkpoints.wait, per round
        self.cpu_s: list[float] = []  # process CPU seconds per step, per round
        self.batches = 0  # batches consumed, for the data state (reading state.step would block)

    def save(self, ckpts: Checkpoints, started: float) -> None:
        start = time.perf_counter()
        data_state = {"epoch": 0, "next_batch": self.batches}
        ckpts.save(self.state, data_state=data_state, config=self.config_dict, started=started)
        self.save_call_s.append(time.perf_counter() - start)

    def run(self, steps: int, every: int | None, ckpts: Checkpoints | None) -> None:
        """`steps` steps, saving on steps 1, 1 + every, ... when `ckpts` is given."""
        started, cpu = time.perf_counter(), time.process_time()
        previous = None  # the last step's metrics, read once the next step is dispatched
        for i in range(steps):
            self.state, step_metrics = self.exp.train_step(self.state, self.batch)
            self.batches += 1
            if previous is not None:
                float(previous["nonfinite"])
            previous = step_metrics
            if ckpts is not None and i % every == 0:
                float(previous["nonfinite"])
                previous = None
                self.save(ckpts, started)
        if previous is not None:
            float(previous["nonfinite"])
        jax.block_until_ready(self.state)
        if ckpts is not None:
            start = time.perf_counter()
            ckpts.wait()
            self.wait_s.append(time.perf_counter() - start)
        self.cpu_s.append((time.process_time() - cpu) / steps)


def committed_steps(directory: str) -> int:
    """Checkpoint step directories on disk (Orbax's temporary ones are not counted)."""
    return sum(name.isdigit() for name in os.listdir(directory)) if os.path.isdir(directory) else 0


def timed_round(loop: Loop, steps: int, every: int | None, counts: list[int]):
    """(wall, process CPU) seconds per step of one round; saving uses a fresh directory."""
    if every is None:
        start = time.perf_counter()
        loop.run(steps, None, None)
        return (time.perf_counter() - start) / steps, loop.cpu_s[-1]
    workdir = tempfile.mkdtemp(prefix="jtrain_ckpt_stall_")
    try:
        ckpts = Checkpoints(workdir, loop.config.checkpoint)
        start = time.perf_counter()
        loop.run(steps, every, ckpts)
        seconds = time.perf_counter() - start
        counts.append(committed_steps(ckpts.directory))
        ckpts.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return seconds / steps, loop.cpu_s[-1]


def interleaved_times(loop: Loop, every: int, rounds: int, steps: int, counts: list[int]):
    """({'never': [...], 'save': [...]} per-step seconds, the same in CPU seconds), A B, B A, ..."""
    modes = [("never", None), ("save", every)]
    times: dict[str, list[float]] = {name: [] for name, _ in modes}
    cpu: dict[str, list[float]] = {name: [] for name, _ in modes}
    for r in range(rounds):
        for name, mode in modes if r % 2 == 0 else reversed(modes):
            wall, cpu_s = timed_round(loop, steps, mode, counts)
            times[name].append(wall)
            cpu[name].append(cpu_s)
    return times, cpu


def state_bytes(state) -> int:
    """Sum of the nbytes of the state's leaves (key arrays counted by their key data)."""
    total = 0
    for leaf in jax.tree.leaves(state):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        total += leaf.nbytes
    return total


def io_throughput(loop: Loop, repeats: int):
    """Blocking save seconds and CPU seconds, restore seconds, max |restored - saved|."""
    save_s, save_cpu_s, restore_s, diff = [], [], [], 0.0
    jax.block_until_ready(loop.state)
    abstract = loop.exp.abstract_sharded_state()
    for _ in range(repeats):
        workdir = tempfile.mkdtemp(prefix="jtrain_ckpt_io_")
        try:
            ckpts = Checkpoints(workdir, loop.config.checkpoint)
            start, cpu = time.perf_counter(), time.process_time()
            loop.save(ckpts, time.perf_counter())
            ckpts.wait()
            save_s.append(time.perf_counter() - start)
            save_cpu_s.append(time.process_time() - cpu)
            start = time.perf_counter()
            restored, _, step = ckpts.restore_latest(abstract)
            jax.block_until_ready(restored)
            restore_s.append(time.perf_counter() - start)
            if step != int(loop.state.step):
                raise RuntimeError(f"restored step {step}, saved {int(loop.state.step)}")
            diffs = jax.tree.map(
                lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                restored.params,
                loop.state.params,
            )
            diff = max([diff, *jax.tree.leaves(diffs)])
            ckpts.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return save_s, save_cpu_s, restore_s, diff


def report_mode(every: int, times, cpu, loop: Loop, events, saves: int):
    """Prints one N's timing table, where the saving time went, and its RATIO line."""
    print(f"\n{'':<8}{'ms/step median':>16}{'ms/step min':>14}  per round (ms)")
    for name, ts in times.items():
        rounds = " ".join(f"{1e3 * t:.1f}" for t in ts)
        print(f"{name:<8}{1e3 * statistics.median(ts):>16.1f}{1e3 * min(ts):>14.1f}  {rounds}")
    never, save = statistics.median(times["never"]), statistics.median(times["save"])
    extra_ms = 1e3 * (save - never) * every  # per save
    call_ms = 1e3 * statistics.mean(loop.save_call_s)
    wait_ms = 1e3 * sum(loop.wait_s) / saves
    orbax_ms = 1e3 * events[BLOCKING_EVENTS["all blocking Orbax work"]] / saves
    print(f"per save (ms)    : {extra_ms:7.1f} extra loop time (median step difference x {every})")
    print(f"                   {call_ms:7.1f} in Checkpoints.save (blocking), of which")
    print(f"                   {call_ms - orbax_ms:7.1f}   jtrain's step read, pack, finite check")
    for label, event in BLOCKING_EVENTS.items():
        print(f"                   {1e3 * events[event] / saves:7.1f}   {label}")
    print(f"                   {wait_ms:7.1f} in the round-ending Checkpoints.wait")
    rest = extra_ms - call_ms - wait_ms
    print(f"                   {rest:7.1f} rest: steps slowed while Orbax works in the background")
    for label, event in BACKGROUND_EVENTS.items():
        print(f"  background     : {1e3 * events[event] / saves:7.1f}   {label}")
    cpu_never, cpu_save = statistics.median(cpu["never"]), statistics.median(cpu["save"])
    print(
        f"process CPU      : {1e3 * cpu_never:.1f} ms/step never, {1e3 * cpu_save:.1f} ms/step save"
        " (medians; XLA's threads make this noisy: see the blocking save's CPU below)"
    )
    ratio = save / never
    print(f"min-based ratio save/never = {min(times['save']) / min(times['never']):.3f}")
    verdict = "" if ratio <= TARGET else "  FAIL"
    print(f"RATIO save every {every} / never = {ratio:.3f} (target <= {TARGET}){verdict}")
    return ratio, extra_ms, 1e3 * never


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = jtrain.config.load(args.config)
    jtrain.config.validate(config)
    loop = Loop(config)
    events = EventLog()
    nbytes = state_bytes(loop.state)
    device = jax.devices()[0]

    print("checkpoint_stall: train steps with async Checkpoints.save every N steps vs never")
    print(f"device           : {device.platform} / {device.device_kind} ({device}), 1 device")
    print(f"versions         : jax {jax.__version__}, orbax-checkpoint {ocp.__version__}")
    print(f"config           : {os.path.relpath(args.config)}")
    print(f"model params     : {loop.exp.param_count():,}")
    print(f"train state      : {nbytes:,} bytes ({nbytes / 1e6:.2f} MB)")
    ck = config.checkpoint
    print(f"checkpoint       : keep={ck.keep} keep_best={ck.keep_best}, async, temp dirs")
    print(f"machine          : {os.cpu_count()} CPUs, load average {_load()} at the start")

    start = time.perf_counter()
    loop.run(1, None, None)  # compiles the step
    print(f"compile + 1 step : {time.perf_counter() - start:.1f} s")
    workdir = tempfile.mkdtemp(prefix="jtrain_ckpt_warm_")
    try:
        ckpts = Checkpoints(workdir, config.checkpoint)
        loop.run(args.warmup, 1, ckpts)  # compiles the packing, warms Orbax's code paths
        ckpts.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    loop.run(args.warmup, None, None)

    summary = []
    for every in args.every:
        steps = every * math.ceil(args.steps_per_round / every)
        loop.save_call_s, loop.wait_s, counts = [], [], []
        events.totals.clear()
        events.active = True
        times, cpu = interleaved_times(loop, every, args.rounds, steps, counts)
        events.active = False
        saves = len(loop.save_call_s)
        print(f"\n== save every {every} step(s): {args.rounds} rounds x {steps} steps per mode")
        summary.append((every, *report_mode(every, times, cpu, loop, events.totals, saves)))
        expected = ck.keep + int(ck.keep_best)
        per_round = math.ceil(steps / every)
        left = sorted(set(counts))
        verdict = "OK" if max(counts) <= expected else f"UNEXPECTED (> keep + best = {expected})"
        print(f"checkpoints left : {left} on disk after rounds of {per_round} saves  {verdict}")

    save_s, save_cpu_s, restore_s, diff = io_throughput(loop, args.io_repeats)
    save_med, restore_med = statistics.median(save_s), statistics.median(restore_s)
    save_cpu_ms = 1e3 * statistics.median(save_cpu_s)
    print(f"\n== throughput ({args.io_repeats} tries, median; state {nbytes / 1e6:.2f} MB)")
    print(f"blocking save    : {1e3 * save_med:.1f} ms = {nbytes / 1e6 / save_med:.1f} MB/s")
    print(f"                   {save_cpu_ms:.1f} ms of process CPU (save + wait, no training)")
    print(f"restore_latest   : {1e3 * restore_med:.1f} ms = {nbytes / 1e6 / restore_med:.1f} MB/s")
    print(f"restored params  : max |restored - saved| = {diff:g}")

    print("\n== summary")
    for every, ratio, _, _ in summary:
        verdict = "" if ratio <= TARGET else "  FAIL"
        print(f"RATIO save every {every:>3} / never = {ratio:.3f} (target <= {TARGET}){verdict}")
    never_ms = statistics.median(t for every, *_, t in summary)
    print(f"CPU per save     : {save_cpu_ms:.1f} ms (save + wait, no training) = ", end="")
    print(
        f"{save_cpu_ms / never_ms:.1%} of a {never_ms:.0f} ms step (the floor of the every-1 cost)"
    )
    print(f"load average     : {_load()} at the end (other processes slow both modes alike)")
    # Larger N from the largest measured one (whose saves, like theirs, never wait on another).
    every, _, extra_ms, never_ms = max(summary)
    for n in (10, 100, 1000):
        if n > every:
            implied = 1 + extra_ms / (n * never_ms)
            print(f"implied every {n:>4} from every {every}'s extra per save: {implied:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
