"""Grain input pipelines: sources -> the task's examples -> rows -> batches -> this process.

`config.data.source` names one source or a weighted mixture; the task parses it and turns each
source's split into an example set (`Task.source_specs`, `Task.examples`): token documents or
fixed-shape arrays. The example set's registered row builder (`jtrain.data.rows`) makes its
endless training rows and its evaluation batches; everything else here is the same for every
kind of data.

A mixture interleaves the sources' rows deterministically in proportion to their weights
(`grain.MapDataset.mix`), so weights are fractions of rows. Rows are batched with Grain, built
in worker processes when `data.workers > 0` (`mp_prefetch`) and prefetched in a background
thread when `data.prefetch > 0`; every variant has the same batches and a checkpointable state
(`get_state`/`set_state`). Evaluation walks a split once, in order, with fixed batch shapes;
for a mixture it walks the concatenation of the sources' splits in spec order.

Batches are numpy dicts of the process-local batch: rows [p*b, (p+1)*b) of the global batch,
with b = train.batch_size // process_count, so the global batch at a step does not depend on
how many processes read it, and each process reads only the examples of its own rows.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator

import grain
import numpy as np

from jtrain import tasks
from jtrain.data import rows as row_kinds
from jtrain.data import sources, tokenizers
from jtrain.tasks.base import Task

Batch = dict[str, np.ndarray]  # inputs, targets: int32[b, L]; loss_weight: float32[b, L]
# With packing also segment_ids, positions: int32[b, L].

# Building a row is microseconds of numpy: reading in the calling thread beats a thread pool,
# and the iterator state then sits exactly at the consumed position.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_MIN_SHM_BYTES = 1 << 20
_ORPHAN_POLL_SECONDS = 0.5  # how soon a worker whose trainer died notices and exits
_DEFAULTS = {
    "packing": True,
    "workers": 0,
    "prefetch": 2,
    "text_field": "text",
}
# Iterators still open at exit are closed, and dropped ones collected, while the interpreter is
# whole: Grain's prefetch iterators left to `__del__` during shutdown fail noisily.
_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_OPEN_ITERATORS):
        iterator.close()
    gc.collect()


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The validated config fields the pipelines read."""

    task: Task
    specs: tuple[sources.SourceSpec, ...]
    source: str
    rows: row_kinds.RowSettings
    workers: int
    prefetch: int
    seed: int
    global_batch: int
    local_batch: int
    process_index: int
    process_count: int


def _data_key(config, key: str):
    return config.data.get(key, _DEFAULTS[key])


def _check_int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _get_tokenizer(spec) -> tokenizers.Tokenizer:
    try:
        return tokenizers.get_tokenizer(spec)
    except Exception as err:  # noqa: BLE001 - any failure to load is a config error
        message = str(err).rstrip(".")
        if "allowed:" not in message:
            names = getattr(tokenizers, "tokenizer_names", lambda: ("byte",))()
            message += (
                f"; allowed: {', '.join(names)}, a tokenizer.json, a SentencePiece .model "
                f"or a directory holding one"
            )
        raise ValueError(f"data.tokenizer={spec!r} cannot be loaded: {message}.") from None


def validate_data_config(config, task: Task | None = None) -> None:
    """Raises a ValueError naming the key whose value cannot work (fast: no reads).

    The pipeline owns `data.*` and the keys that shape its batches: `train.seq_len`,
    `train.batch_size`, `eval.steps` and `seed`.
    """
    _validated(config, task or tasks.get(config))
    _settings(config, 0, 1, task)
    _eval_steps(config)


def _validated(config, task: Task) -> tuple[tuple[sources.SourceSpec, ...], tokenizers.Tokenizer]:
    tokenizer = _get_tokenizer(config.data.tokenizer)
    specs = task.source_specs(config.data.source)
    for spec in specs:
        if spec.kind == "prepared":
            manifest = sources.read_manifest(config.data.source, spec.target)
            sources.check_tokenizer(
                config.data.source, spec.target, manifest, config.data.tokenizer, tokenizer
            )
        else:
            sources.check(spec, config.data.source)
    packing_ = _data_key(config, "packing")
    if not isinstance(packing_, (bool, np.bool_)):
        raise ValueError(f"data.packing must be True or False, got {packing_!r}.")
    for key in ("workers", "prefetch"):
        _check_int(f"data.{key}", _data_key(config, key), 0)
    text_field = _data_key(config, "text_field")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"data.text_field must be a non-empty string, got {text_field!r}.")
    return specs, tokenizer


def _settings(
    config, process_index: int, process_count: int, task: Task | None = None
) -> _Settings:
    task = task or tasks.get(config)
    specs, tokenizer = _validated(config, task)
    seq_len = _check_int("train.seq_len", config.train.seq_len, 1)
    global_batch = _check_int("train.batch_size", config.train.batch_size, 1)
    process_count = _check_int("process_count", process_count, 1)
    process_index = _check_int("process_index", process_index, 0)
    if process_index >= process_count:
        raise ValueError(f"process_index={process_index} must be < process_count={process_count}.")
    if global_batch % process_count:
        raise ValueError(
            f"train.batch_size={global_batch} (the global batch) must be divisible by the "
            f"{process_count} processes; use a multiple of {process_count}."
        )
    if isinstance(config.seed, bool) or not isinstance(config.seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {config.seed!r}.")
    return _Settings(
        task=task,
        specs=specs,
        source=config.data.source,
        rows=row_kinds.RowSettings(
            seq_len=seq_len,
            pad_id=int(tokenizer.pad_id),
            packing=bool(_data_key(config, "packing")),
            whole_examples=not task.splittable_examples,
        ),
        workers=int(_data_key(config, "workers")),
        prefetch=int(_data_key(config, "prefetch")),
        seed=int(config.seed),
        global_batch=global_batch,
        local_batch=global_batch // process_count,
        process_index=process_index,
        process_count=process_count,
    )


def _split_examples(s: _Settings, split: str):
    parts = [s.task.examples(spec, split) for spec in s.specs]
    return parts[0] if len(parts) == 1 else row_kinds.builder_for(parts[0]).concat(parts)


def _data_seeds(seed: int, source_index: int = 0) -> tuple[int, int]:
    """Returns (shuffle seed, cut-offset seed) of a mixture's source, both in [0, 2**32)."""
    # Grain reseeds epoch e with shuffle seed + e; hashing the config seed keeps runs with
    # seeds s and s + 1 from replaying the same row orders one epoch apart.
    entropy = [seed % 2**64, 0x6A747261696E] + ([source_index] if source_index else [])
    state = np.random.SeedSequence(entropy).generate_state(2)
    return int(state[0]), int(state[1])


def _source_rows(s: _Settings, index: int, spec: sources.SourceSpec):
    """(the endless rows of one source of the mixture, its row builder)."""
    examples = s.task.examples(spec, "train")
    builder = row_kinds.builder_for(examples)
    where = f"the train split of {spec}" + (f" in data.source={s.source!r}" if index else "")
    settings = dataclasses.replace(s.rows, where=where)
    return builder.train_rows(examples, settings, *_data_seeds(s.seed, index)), builder


def epoch_examples(config, *, task: Task | None = None) -> int:
    """Training examples (rows) in one epoch: every source's train split once."""
    s = _settings(config, 0, 1, task)
    total = 0
    for spec in s.specs:
        examples = s.task.examples(spec, "train")
        total += row_kinds.builder_for(examples).epoch_rows(examples, s.rows)
    return total


def train_dataset(
    config, *, task: Task | None = None, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
    """Returns this process's endless training batches as a Grain MapDataset (index = step)."""
    s = _settings(config, process_index, process_count, task)
    sources_rows = [_source_rows(s, k, spec) for k, spec in enumerate(s.specs)]
    row_sets, builders = [r for r, _ in sources_rows], [b for _, b in sources_rows]
    if len({type(b) for b in builders}) > 1:
        raise ValueError(f"data.source={s.source!r} mixes different kinds of examples.")
    rows = row_sets[0]
    if len(row_sets) > 1:
        rows = grain.MapDataset.mix(row_sets, [spec.weight for spec in s.specs])
    return (
        # Local batches in global order; process p takes every process_count-th one, so
        # global batch t is local batches t * process_count + (0, 1, ...) in process order.
        rows.batch(s.local_batch, drop_remainder=True)
        .slice(slice(s.process_index, None, s.process_count))
        .map(builders[0].collate(s.rows))
    )


def make_train_iterator(
    config, *, task: Task | None = None, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator of this process's training batches.

    `task` is the objective whose examples to read (default: the one `config.task` names).
    """
    dataset = train_dataset(
        config, task=task, process_index=process_index, process_count=process_count
    )
    workers, prefetch = int(_data_key(config, "workers")), int(_data_key(config, "prefetch"))
    iter_dataset = dataset.to_iter_dataset(_READ_OPTIONS)
    if workers:
        # Worker w builds batches w, w + workers, ...; Grain interleaves them back in order,
        # and the state records each worker's position, so it restores exactly.
        options = grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, prefetch)
        )
        _use_flag_defaults_if_unparsed()
        # Arrays under 1 MiB go through the queue: a shared-memory block per array costs more.
        shm_options = grain.experimental.DatasetOptions(min_shm_size=_MIN_SHM_BYTES)
        iter_dataset = grain.experimental.WithOptionsIterDataset(iter_dataset, shm_options)
        iter_dataset = iter_dataset.mp_prefetch(
            options, worker_init_fn=functools.partial(_init_worker, os.getpid())
        )
    if prefetch:
        iter_dataset = grain.experimental.ThreadPrefetchIterDataset(
            iter_dataset, prefetch_buffer_size=prefetch
        )
    iterator = iter(iter_dataset)
    _OPEN_ITERATORS.add(iterator)
    return iterator


def _init_worker(trainer_pid: int, worker_index: int, worker_count: int) -> None:
    """Runs first in each Grain worker process: Ctrl-C is the trainer's to act on, and a
    worker ends with its trainer, even one killed by SIGKILL."""
    # Ctrl-C reaches the terminal's whole process group: a worker it killed would fail the
    # step the trainer finishes before saving. SIGTERM keeps its default: multiprocessing
    # stops leftover workers with it at exit, then waits for them without a time limit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch = threading.Thread(target=_exit_when_orphaned, args=(trainer_pid,), daemon=True)
    watch.start()


def _exit_when_orphaned(trainer_pid: int) -> None:
    # Not prctl(PR_SET_PDEATHSIG): it fires when the *thread* that started the worker ends, and
    # Grain starts workers from thread pools it replaces (on set_state, for one).
    while os.getppid() == trainer_pid:
        time.sleep(_ORPHAN_POLL_SECONDS)
    os._exit(0)


def _use_flag_defaults_if_unparsed() -> None:
    # Grain <= 0.2.18 reads an absl flag in mp_prefetch and fails when absl has not parsed
    # the command line (tests, notebooks, scripts without absl.app): google/grain#1355.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _eval_steps(config) -> int:
    steps = config.eval.steps
    if (
        isinstance(steps, bool)
        or not isinstance(steps, (int, np.integer))
        or not (steps == -1 or steps >= 1)
    ):
        raise ValueError(
            f"eval.steps must be -1 (the whole split) or a positive number of batches, "
            f"got {steps!r}."
        )
    return int(steps)


def eval_batches(
    config,
    split: str,
    *,
    task: Task | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Returns this process's batches covering `split` once, in order, with fixed shapes.

    For a mixture, the split is the concatenation of every source's split in spec order, so
    each source counts by its size (not its weight). Padding rows have loss weight 0.
    """
    s = _settings(config, process_index, process_count, task)
    if split not in sources.SPLITS:
        raise ValueError(f"Unknown split {split!r}; allowed: {', '.join(sources.SPLITS)}.")
    steps = _eval_steps(config)
    examples = _split_examples(s, split)
    num_rows, make_batch = row_kinds.builder_for(examples).eval_rows(examples, s.rows)
    return (make_batch(_local_rows(s, step)) for step in range(_num_batches(num_rows, s, steps)))


def _local_rows(s: _Settings, step: int) -> np.ndarray:
    return step * s.global_batch + s.process_index * s.local_batch + np.arange(s.local_batch)


def _num_batches(num_rows: int, s: _Settings, steps: int) -> int:
    num_batches = -(-num_rows // s.global_batch)
    return min(num_batches, steps) if steps > 0 else num_batches
