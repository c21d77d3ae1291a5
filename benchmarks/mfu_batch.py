"""The largest batch of a compiled train step that fits on one device, for benchmarks/mfu.py.

Batch sizes are powers of two up to a cap. XLA's memory analysis of a compiled step says what
it needs (arguments, outputs not aliased to them, temporaries) before anything runs. Probe
compiles at batch 1 and 2 give the bytes per example; the largest size predicted to fit is
compiled and checked against the memory available, doubling while the next size is predicted
to fit and halving when one does not, so sizes that cannot fit are never compiled. An
out-of-memory error (RESOURCE_EXHAUSTED, the only error caught) counts as not fitting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

GIB = 2.0**30
SAFETY = 0.97  # a predicted size must leave this much of the memory free: the fit is linear


def is_oom(err: BaseException) -> bool:
    """True for XLA's out-of-memory error, from the compiler or a run."""
    return isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err)


def needed_bytes(compiled) -> int:
    """Device bytes a compiled step holds while it runs, per XLA's memory analysis."""
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def largest_power_of_two(cap: int) -> int:
    """The largest power of two <= cap (cap >= 1)."""
    return 1 << (cap.bit_length() - 1)


def predict(points: dict[int, int], batch: int) -> float:
    """Bytes at `batch` on the line through the two largest measured batches."""
    (b0, n0), (b1, n1) = sorted(points.items())[-2:]
    return n1 + (n1 - n0) / (b1 - b0) * (batch - b1)


@dataclasses.dataclass
class Fit:
    """A batch size, its compiled step and the bytes XLA says that step needs."""

    batch: int
    compiled: object
    needed: int


# compile_at(batch, probe) -> the compiled step; probe=True may compile a cheaper variant whose
# memory analysis is all that is read. May raise XLA's out-of-memory error.
CompileAt = Callable[[int, bool], object]


def choose_batch(
    cap: int, available: int | None, compile_at: CompileAt, notes: list[str]
) -> Fit | None:
    """The largest power-of-two batch <= cap whose step fits in `available` bytes (None: no
    known limit, so the cap); None if not even batch 1 fits. Appends why sizes were dropped."""
    if cap < 1:
        return None
    if available is None:
        return _largest_compiling(largest_power_of_two(cap), compile_at, notes)
    points = {}
    for batch in (1, 2)[: min(cap, 2)]:
        needed = _needed_or_none(batch, True, compile_at, notes)
        if needed is None or needed > available:
            if needed is not None:
                notes.append(_too_big(batch, needed, available))
            if batch == 1:
                return None
            break
        points[batch] = needed
    batch, ceiling, fit = _predicted_largest(points, available, cap), cap, None
    while 1 <= batch <= ceiling:
        found = _needed_or_none(batch, False, compile_at, notes, keep=True)
        if found is not None and found[1] <= available:
            fit, points[batch] = Fit(batch, *found), found[1]
            if 2 * batch > ceiling or predict(points, 2 * batch) > available * SAFETY:
                break  # the next size is predicted not to fit: it is not compiled
            batch *= 2
            continue
        if found is not None:
            notes.append(_too_big(batch, found[1], available))
        if fit is not None:
            break
        ceiling, batch = batch - 1, batch // 2
    return fit


def _too_big(batch: int, needed: int, available: int) -> str:
    return f"batch {batch} needs {needed / GIB:.1f} GiB of {available / GIB:.1f} available"


def _predicted_largest(points: dict[int, int], available: int, cap: int) -> int:
    batch = largest_power_of_two(cap)
    if len(points) < 2:
        return 1
    while batch > 1 and predict(points, batch) > available * SAFETY:
        batch //= 2
    return batch


def _needed_or_none(batch, probe, compile_at, notes, keep=False):
    """Bytes needed at `batch` (with the compiled step if keep); None if compiling ran out of
    memory."""
    try:
        compiled = compile_at(batch, probe)
    except jax.errors.JaxRuntimeError as err:
        if not is_oom(err):
            raise
        notes.append(f"batch {batch}: out of memory compiling")
        return None
    needed = needed_bytes(compiled)
    return (compiled, needed) if keep else needed


def _largest_compiling(batch: int, compile_at: CompileAt, notes: list[str]) -> Fit | None:
    """Without a memory limit: `batch`, halved while compiling runs out of memory."""
    while batch >= 1:
        found = _needed_or_none(batch, False, compile_at, notes, keep=True)
        if found is not None:
            return Fit(batch, *found)
        batch //= 2
    return None
