"""Throughput accounting (peak FLOP/s, MFU) and the metric writers of a run.

`MetricWriter` owns the workdir's `metrics.jsonl` (one exact JSON line per logged event) and
`tensorboard/` event files, and prints one compact line per event (through `jtrain.console`,
which keeps a progress bar below it or adds the time left to train lines). `read_metrics`
parses the JSONL back, so tests and benchmarks compare runs float for float.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jtrain import console

# Dense bf16 peak FLOP/s per chip, keyed by a lowercase substring of `Device.device_kind`.
# The longest matching key wins: JAX calls v5e "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite".
PEAK_FLOPS: dict[str, float] = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5": 459e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "trillium": 918e12,
    "a100": 312e12,
    "h100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "h100 pcie": 756e12,
    "h100 nvl": 835e12,
    "h200": 989e12,
    "b200": 2250e12,  # HGX B200: 4.5 PFLOP/s with 2:4 sparsity, half of it dense
}

_MATMUL_SIZE = 1024  # big enough to keep the CPU's vector units busy, small enough to repeat


def _table_peak_flops(device_kind: str) -> float:
    kind = device_kind.lower()
    matches = [key for key in PEAK_FLOPS if key in kind]
    return PEAK_FLOPS[max(matches, key=len)] if matches else 0.0


def measure_cpu_flops(seconds: float = 0.5) -> float:
    """Returns the host CPU's f32 matmul FLOP/s, timed for about `seconds` after compiling."""
    n = _MATMUL_SIZE
    x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices(backend="cpu")[0])
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(x, x).block_until_ready()  # compile and warm up outside the timed loop
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        matmul(x, x).block_until_ready()
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


@functools.cache
def _measured_cpu_flops() -> float:
    return measure_cpu_flops()


def device_peak_flops(device: jax.Device, configured: float = 0.0) -> float:
    """Returns the peak FLOP/s of one device: configured, else known, else measured; 0 if none."""
    if configured > 0:
        return float(configured)
    peak = _table_peak_flops(device.device_kind)
    if peak > 0:
        return peak
    if device.platform == "cpu":
        # Fake CPU devices share the host's cores, so each gets an equal share.
        return _measured_cpu_flops() / len(jax.local_devices(backend="cpu"))
    logging.warning(
        "Unknown peak FLOP/s for device kind %r; MFU is reported as 0. "
        "Set --config.metrics.peak_flops_per_device to fix.",
        device.device_kind,
    )
    return 0.0


def mfu(
    flops_per_example: float,
    examples_per_second: float,
    num_devices: int,
    peak_flops_per_device: float,
) -> float:
    """Returns model FLOPs utilisation as a fraction (0.0 when the peak is unknown)."""
    if peak_flops_per_device <= 0 or num_devices <= 0:
        return 0.0
    return flops_per_example * examples_per_second / (num_devices * peak_flops_per_device)


class Throughput:
    """Examples/s (and tokens/s where the task has tokens), step time and MFU over the steps
    since the last report or restart."""

    def __init__(self, exp):
        self.examples_per_step = exp.config.train.batch_size
        self.tokens_per_example = exp.task.tokens_per_example()
        # A frozen base gets no weight gradients: fewer FLOPs per example.
        self.flops_per_example = exp.task.flops_per_example(weight_grads=not exp.has_frozen_base())
        self.num_devices = exp.mesh.size
        peak = exp.config.metrics.peak_flops_per_device
        self.peak = device_peak_flops(exp.mesh.devices.flat[0], peak)
        self.restart(0)

    def restart(self, step: int) -> None:
        """Starts a new interval (after compilation or evaluation, which it must not count)."""
        self.step, self.time = step, time.perf_counter()

    def report(self, step: int) -> dict[str, float]:
        """The rates since the last report; empty if no step or no time has passed."""
        now = time.perf_counter()
        steps, seconds = step - self.step, now - self.time
        self.restart(step)
        if steps <= 0 or seconds <= 0:
            return {}
        examples_per_s = steps * self.examples_per_step / seconds
        rates = {"step_time": seconds / steps, "examples_per_s": examples_per_s}
        if self.tokens_per_example:
            rates["tokens"] = self.examples_per_step * self.tokens_per_example
            rates["tokens_per_s"] = examples_per_s * self.tokens_per_example
        flops, devices = self.flops_per_example, self.num_devices
        rates["mfu"] = mfu(flops, examples_per_s, devices, self.peak)
        return rates


def _to_python(name: str, value: Any) -> float | int:
    """Turns a Python, numpy or jax scalar into a Python int or float without rounding."""
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"Metric {name!r} must be a scalar, got shape {array.shape}.")
    if array.dtype.kind in "biu":
        return int(array.reshape(()))
    return float(array.reshape(()))


def _format(name: str, value: float | int) -> str:
    """Formats one metric for the human-readable stdout line."""
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if name == "mfu":
        return f"{value:.1%}"
    if name in ("lr", "learning_rate") or name.endswith("_lr"):
        return f"{value:.1e}"
    if "/s" in name or "per_s" in name or "throughput" in name:
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    if float(value).is_integer() and abs(value) >= 1000:  # counts, e.g. tokens
        return f"{value:,.0f}"
    if value == 0 or 1e-2 <= abs(value) < 1e6:
        return f"{value:.4f}"
    return f"{value:.3e}"


def import_tensorboardx_without_torch() -> None:
    """Imports tensorboardX without the torch its package `__init__` imports when installed.

    `import tensorboardX` runs tensorboardX.writer, which imports torch if it can, only to
    accept torch tensors in SummaryWriter; jtrain writes events without SummaryWriter and
    never needs torch, whose import costs seconds at the start of every run (its
    `numpy_compatible` falls back to numpy.ndarray). A torch already imported is used as is,
    and torch imports normally again afterwards.
    """
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # makes `import torch` raise ImportError meanwhile
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        pass  # a tensorboardX that needs torch: imported normally by the caller
    finally:
        del sys.modules["torch"]


class EventFile:
    """TensorBoard scalars written in the calling thread, each event flushed as it is written.

    tensorboardX's SummaryWriter hands events to a background thread through a
    multiprocessing.Queue of 10 and joins that thread in close() with no time limit: once the
    thread has died (a write that failed: a full disk), the 11th event and close() wait
    forever, and a Ctrl-C landing in that machinery has hung a run's exit. Written here, an
    event is on disk when `write` returns, a failed write raises there, and closing is
    closing a file.
    """

    def __init__(self, logdir: str, *, prefix: str = "events", suffix: str = ""):
        # Deferred: only process 0 with a workdir needs them.
        import_tensorboardx_without_torch()
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.record_writer import directory_check

        directory_check(logdir)
        self._events = EventsWriter(os.path.join(logdir, prefix), filename_suffix=suffix)

    def write(self, step: int, scalars: Mapping[str, float | int]) -> None:
        from tensorboardX import summary

        # summary.scalar makes the Summary SummaryWriter.add_scalar makes (tags cleaned alike).
        self.write_values(step, [summary.scalar(t, v).value[0] for t, v in scalars.items()])

    def write_values(self, step: int, values: Sequence) -> None:
        """Writes `values` (Summary.Value protos: scalars, text, plugin data) as one event."""
        from tensorboardX.proto import event_pb2

        event = event_pb2.Event(wall_time=time.time(), step=step, summary={"value": values})
        self._events.write_event(event)
        self._events.flush()

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


class Sink(Protocol):
    """Somewhere else every event also goes (Weights & Biases): given the event's values as
    Python numbers, after metrics.jsonl has them; closed with the writer."""

    def write(self, step: int, split: str, values: Mapping[str, float | int]) -> None: ...

    def close(self) -> None: ...


class MetricWriter:
    """Writes metrics to stdout, `workdir/metrics.jsonl`, `workdir/tensorboard/` and the
    `sinks` given.

    Only process 0 writes; on other processes every method is a no-op.
    """

    def __init__(
        self, workdir: str | None, *, log_to_stdout: bool = True, sinks: Sequence[Sink] = ()
    ):
        self._active = jax.process_index() == 0
        self._log_to_stdout = log_to_stdout and self._active
        self._jsonl = None
        self._tb = None
        self._sinks = list(sinks) if self._active else []
        if workdir is None or not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        # A run killed mid-line leaves a partial line; end it so the next event starts cleanly.
        ends_mid_line = False
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                ends_mid_line = f.read(1) != b"\n"
        self._jsonl = open(path, "a", buffering=1, encoding="utf-8")
        if ends_mid_line:
            self._jsonl.write("\n")
        self._tb = EventFile(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Logs one event: `metrics` of `split` (train | val | test) at `step`."""
        if not self._active:
            return
        if "step" in metrics or "split" in metrics:
            raise ValueError("Metric names 'step' and 'split' are reserved; rename the metric.")
        step = int(step)
        values = {name: _to_python(name, value) for name, value in metrics.items()}
        if self._jsonl is not None:
            # json.dumps writes floats with repr, so float(text) gives back the same float.
            self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.write(step, {f"{split}/{name}": value for name, value in values.items()})
        for sink in self._sinks:
            sink.write(step, split, values)
        if self._log_to_stdout:
            fields = [f"{name} {_format(name, value)}" for name, value in values.items()]
            # Through the console: around a progress bar, with its time left in log mode.
            console.metric(step, split, " | ".join([f"step {step:>5}", split, *fields]))

    def flush(self) -> None:
        """Pushes buffered JSONL lines and TensorBoard events to disk."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the files; later writes only go to stdout."""
        jsonl, tb, sinks = self._jsonl, self._tb, self._sinks
        self._jsonl = self._tb = None
        self._sinks = []
        try:
            if jsonl is not None:
                jsonl.close()
        finally:
            try:
                if tb is not None:
                    tb.close()
            finally:
                for sink in sinks:
                    sink.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_metrics(path: str, *, missing_ok: bool = False) -> list[dict]:
    """Parses a metrics.jsonl (or the one in a workdir) into one dict per logged event; with
    `missing_ok`, a workdir that has logged nothing yet gives no events."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if missing_ok and not os.path.exists(path):
        return []
    events = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                # Only a run killed mid-write leaves such a line; the events around it are whole.
                logging.warning("Skipping truncated line %s:%d: %r", path, line_number, line)
    return events
