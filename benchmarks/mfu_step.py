"""One combination of benchmarks/mfu.py's sweep, measured: jtrain's train step built from a
config as the trainer builds it, compiled per batch size as the loop compiles it, sized to the
device (benchmarks/mfu_batch.py) and timed on synthetic token batches.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

import jtrain.config
from benchmarks import mfu_batch, mfu_flops
from jtrain import metrics
from jtrain.experiment import Experiment
from jtrain.models.transformer import TransformerConfig
from jtrain.validation import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = mfu_batch.GIB
# The probes' compiles only size the step, so a GPU skips autotuning their matmuls.
GPU_PROBE_OPTIONS = {"xla_gpu_autotune_level": 0}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model shape (config overrides) with the sweep settings that suit it."""

    description: str
    overrides: dict
    loss_chunk: int  # the non-zero model.loss_chunk of the sweep
    max_batch: int
    matmul_n: int  # side of the square matmul timed as the measured peak


@dataclasses.dataclass(frozen=True)
class Combination:
    """One point of the sweep: the model.* values it sets."""

    dtype: str
    attention: str
    loss_chunk: int
    remat: str

    @property
    def label(self) -> str:
        return f"{self.dtype} {self.attention} chunk={self.loss_chunk} remat={self.remat}"

    def overrides(self) -> dict:
        return {f"model.{k}": v for k, v in dataclasses.asdict(self).items()}


def build_config(shape: Shape, combo: Combination):
    """configs/default.py with the shape's and the combination's values, validated."""
    config = jtrain.config.load(os.path.join(REPO_ROOT, "configs", "default.py"))
    for key, value in {**shape.overrides, **combo.overrides()}.items():
        section, name = key.split(".")
        config[section][name] = value
    config.data.packing = False  # the synthetic rows are whole sequences: no segment ids
    config.train.batch_size = 1  # the step is lowered at each batch size tried
    jtrain.config.validate(config)
    return config


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens shaped and typed as the pipeline's unpacked batches."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
    weight = np.ones((batch, seq_len), np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weight": weight}


@dataclasses.dataclass
class Result:
    """What one combination measured; `line()` is how the benchmark prints it."""

    combo: Combination
    batch: int
    step_s: float
    tokens_per_s: float
    model_flops_per_s: float
    mfu_nominal: float | None  # None: no datasheet peak for this device
    mfu_measured: float
    xla_over_ours: float
    xla_over_ours_as_counted: float
    needed: int
    loss: float
    compiles: int
    compile_s: float

    def line(self) -> str:
        nominal = "n/a" if self.mfu_nominal is None else f"{100 * self.mfu_nominal:.1f}%"
        return (
            f"{self.combo.label:<39} | batch {self.batch:>3} | step {1e3 * self.step_s:,.1f} ms"
            f" | {self.tokens_per_s:,.0f} tokens/s | {self.model_flops_per_s / 1e12:.3g} TFLOP/s"
            f" | MFU {nominal} nominal, {100 * self.mfu_measured:.1f}% measured"
            f" | XLA/ours {self.xla_over_ours:.3f}, {self.xla_over_ours_as_counted:.3f} as counted"
            f" | memory {self.needed / GIB:.2f} GiB | loss {self.loss:.3f}"
            f" | compile {self.compile_s:.1f} s ({self.compiles})"
        )


class Bench:
    """The device, the shared train state and the peaks; measures one combination at a time.

    Every combination has the same parameters and optimizer state (dtype, attention, remat and
    loss chunking change the computation only), so one state is made and passed from step to
    step, donated as the loop donates it; it is made again only if a failed run freed it.
    """

    def __init__(self, shape: Shape, device: jax.Device, *, steps: int, warmup: int, cap: int):
        self.shape, self.device = shape, device
        self.steps, self.warmup, self.cap = steps, warmup, cap
        self.state, self.batches_made = None, 0
        self.peaks: dict[str, tuple[float, float]] = {}  # dtype -> (nominal, measured)

    def measure_peaks(self, dtypes: list[str]) -> None:
        """The datasheet's and a timed matmul's FLOP/s of the device in each dtype."""
        seconds = 0.5 if self.device.platform == "cpu" else 1.0
        for dtype in dtypes:
            n = self.shape.matmul_n
            measured = mfu_flops.measure_matmul_flops(self.device, dtype, n, seconds)
            self.peaks[dtype] = (mfu_flops.nominal_peak(self.device, dtype), measured)

    def available(self) -> int | None:
        """Bytes a step may use: the device's limit less what other arrays hold (the state
        is the step's own argument); None where the device reports no limit (CPU)."""
        stats = self.device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(self.state))
        return stats["bytes_limit"] - stats["bytes_in_use"] + state_bytes

    def ensure_state(self, exp: Experiment) -> None:
        """A live state shaped as `exp`'s: kept from the last combination where it can be."""
        leaves = jax.tree.leaves(self.state)
        same = jax.tree.structure(self.state) == jax.tree.structure(exp.abstract_state)
        if self.state is None or not same or any(x.is_deleted() for x in leaves):
            self.state = None  # freed before the new one is made
            self.state = exp.init_state()

    def measure(self, combo: Combination) -> Result | str:
        """The combination's result at the largest batch that fits, or why there is none."""
        try:
            config = build_config(self.shape, combo)
        except ConfigError as err:
            return f"config rejected: {err}"
        exp = Experiment.from_config(config, devices=[self.device])
        self.ensure_state(exp)
        compiler = _Compiler(exp, self.device)
        notes, cap = [], self.cap
        while True:
            fit = mfu_batch.choose_batch(cap, self.available(), compiler.compile_at, notes)
            if fit is None:
                return "does not fit" + (f": {'; '.join(notes)}" if notes else "")
            try:
                step_s, loss = self.time_steps(exp, fit)
            except jax.errors.JaxRuntimeError as err:
                if not mfu_batch.is_oom(err):
                    raise
                notes.append(f"batch {fit.batch}: out of memory running")
                self.ensure_state(exp)
                cap = fit.batch // 2
                continue
            return self._result(combo, exp, fit, step_s, loss, compiler)

    def time_steps(self, exp: Experiment, fit: mfu_batch.Fit) -> tuple[float, float]:
        """(seconds per step over the timed steps, the last loss), after the warm-up.

        Every step gets a batch of its own, made on the device beforehand: random tokens
        cannot be learned, so the loss stays near log(vocabulary) from one combination to the
        next (the state goes on training), a check that each step computed the real loss."""
        seq_len, vocab = exp.config.train.seq_len, exp.config.model.vocab_size
        batches = [
            exp.global_batch(synthetic_batch(fit.batch, seq_len, vocab, seed=self.batches_made + i))
            for i in range(self.warmup + self.steps)
        ]
        self.batches_made += len(batches)
        for batch in batches[: self.warmup]:
            self.state, step_metrics = fit.compiled(self.state, batch)
        jax.block_until_ready(self.state)
        start = time.perf_counter()
        for batch in batches[self.warmup :]:
            self.state, step_metrics = fit.compiled(self.state, batch)
        jax.block_until_ready(self.state)
        return (time.perf_counter() - start) / self.steps, float(step_metrics["loss"])

    def _result(self, combo, exp, fit, step_s, loss, compiler) -> Result:
        seq_len = exp.config.train.seq_len
        per_example = exp.task.flops_per_example()  # what the trainer's MFU counts
        examples_per_s = fit.batch / step_s
        nominal, measured = self.peaks[combo.dtype]
        xla = mfu_flops.xla_flops(fit.compiled)
        cfg = TransformerConfig.from_mapping(exp.config.model)
        as_counted = mfu_flops.flops_as_xla_counts(cfg, seq_len) * fit.batch
        return Result(
            combo=combo,
            batch=fit.batch,
            step_s=step_s,
            tokens_per_s=examples_per_s * seq_len,
            model_flops_per_s=per_example * examples_per_s,
            mfu_nominal=metrics.mfu(per_example, examples_per_s, 1, nominal) if nominal else None,
            mfu_measured=metrics.mfu(per_example, examples_per_s, 1, measured),
            xla_over_ours=xla / (per_example * fit.batch),
            xla_over_ours_as_counted=xla / as_counted,
            needed=fit.needed,
            loss=loss,
            compiles=compiler.count,
            compile_s=compiler.seconds,
        )


class _Compiler:
    """exp.train_step lowered and compiled once per batch size, as the loop compiles it."""

    def __init__(self, exp: Experiment, device: jax.Device):
        self.exp, self.gpu = exp, device.platform == "gpu"
        self.cache: dict[tuple[int, bool], object] = {}
        self.count, self.seconds = 0, 0.0

    def compile_at(self, batch: int, probe: bool):
        key = (batch, probe and self.gpu)  # off a GPU a probe is the real compile
        if key not in self.cache:
            rows = synthetic_batch(batch, self.exp.config.train.seq_len, 2)
            sharding = self.exp.batch_sharding
            spec = {
                k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                for k, v in rows.items()
            }
            start = time.perf_counter()
            lowered = self.exp.train_step.lower(self.exp.abstract_sharded_state(), spec)
            self.cache[key] = lowered.compile(GPU_PROBE_OPTIONS if key[1] else None)
            self.count += 1
            self.seconds += time.perf_counter() - start
        return self.cache[key]
