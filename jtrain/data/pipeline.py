"""Grain input pipelines for language modelling on a named text source.

The documents of a split are tokenized as BOS ... EOS and concatenated into one token stream,
cached per process. Training cuts the train stream into non-overlapping rows of seq_len + 1
tokens, at a cut offset that changes every epoch so the model sees new context boundaries,
shuffles the rows per epoch and batches them with Grain; the iterator's get_state/set_state
make it checkpointable. Evaluation walks a split once, in order, with fixed batch shapes.

Batches are numpy dicts of the process-local batch: rows [p*b, (p+1)*b) of the global batch,
with b = train.batch_size // process_count, so the global batch at a step does not depend on
how many processes read it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator

import grain
import numpy as np

from jtrain.data import sources, tokenizers

Batch = dict[str, np.ndarray]  # inputs, targets: int32[b, L]; mask: float32[b, L]

# Building a row is microseconds of numpy slicing: reading in the calling thread beats a thread
# pool, and the iterator state then sits exactly at the consumed position.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The validated config fields the pipelines read."""

    source: str
    tokenizer: str
    seed: int
    seq_len: int
    global_batch: int
    local_batch: int
    process_index: int
    process_count: int


def _check_int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_names(config) -> tuple[str, str]:
    source, tokenizer = config.data.source, config.data.tokenizer
    if source not in sources.source_names():
        raise ValueError(
            f"data.source={source!r} is not a known source; "
            f"allowed: {', '.join(sources.source_names())}."
        )
    if tokenizer not in tokenizers.tokenizer_names():
        raise ValueError(
            f"data.tokenizer={tokenizer!r} is not a known tokenizer; "
            f"allowed: {', '.join(tokenizers.tokenizer_names())}."
        )
    return source, tokenizer


def _settings(config, process_index: int, process_count: int) -> _Settings:
    source, tokenizer = _check_names(config)
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
        source=source,
        tokenizer=tokenizer,
        seed=int(config.seed),
        seq_len=seq_len,
        global_batch=global_batch,
        local_batch=global_batch // process_count,
        process_index=process_index,
        process_count=process_count,
    )


def token_stream(docs: list[str], tokenizer: tokenizers.Tokenizer) -> np.ndarray:
    """Returns the int32 concatenation of `tokenizer.encode(doc)` (BOS ... EOS) over `docs`."""
    if not docs:
        return np.zeros((0,), dtype=np.int32)
    return np.concatenate([tokenizer.encode(doc) for doc in docs]).astype(np.int32, copy=False)


@functools.cache
def _split_stream(source: str, tokenizer: str, split: str) -> np.ndarray:
    docs = sources.load_source(source)[split]
    stream = token_stream(docs, tokenizers.get_tokenizer(tokenizer))
    stream.setflags(write=False)  # shared by every pipeline in the process
    return stream


def split_token_counts(config) -> dict[str, int]:
    """Returns the number of tokens in each split's stream."""
    source, tokenizer = _check_names(config)
    return {split: int(_split_stream(source, tokenizer, split).size) for split in sources.SPLITS}


def _to_batch(rows: np.ndarray, pad_id: int) -> Batch:
    """Turns int32[b, L + 1] rows into next-token inputs, targets and a PAD mask."""
    targets = np.ascontiguousarray(rows[:, 1:])
    return {
        "inputs": np.ascontiguousarray(rows[:, :-1]),
        "targets": targets,
        "mask": (targets != pad_id).astype(np.float32),
    }


def _data_seeds(seed: int) -> tuple[int, int]:
    """Returns (shuffle seed, cut-offset seed), both in [0, 2**32)."""
    # Grain reseeds epoch e with shuffle seed + e; hashing the config seed keeps runs with
    # seeds s and s + 1 from replaying the same row orders one epoch apart.
    state = np.random.SeedSequence([seed % 2**64, 0x6A747261696E]).generate_state(2)
    return int(state[0]), int(state[1])


class _EpochRows:
    """Maps (global row index, row within its epoch) to seq_len + 1 tokens of the stream."""

    def __init__(self, stream: np.ndarray, seq_len: int, rows_per_epoch: int, offset_seed: int):
        self._stream = stream
        self._row_len = seq_len + 1
        self._rows_per_epoch = rows_per_epoch
        self._offset_seed = offset_seed

    def offset(self, epoch: int) -> int:
        """Returns where epoch `epoch` starts cutting rows, in [0, seq_len]."""
        digest = hashlib.sha256(f"{self._offset_seed}:{epoch}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % self._row_len

    def __call__(self, index: int, row: int) -> np.ndarray:
        start = self.offset(index // self._rows_per_epoch) + row * self._row_len
        return self._stream[start : start + self._row_len]


def train_rows_per_epoch(num_tokens: int, seq_len: int) -> int:
    """Returns how many rows every epoch has, whatever its cut offset in [0, seq_len]."""
    return max(0, (num_tokens - seq_len) // (seq_len + 1))


def make_train_iterator(
    config, *, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator of this process's training batches."""
    s = _settings(config, process_index, process_count)
    stream = _split_stream(s.source, s.tokenizer, "train")
    rows_per_epoch = train_rows_per_epoch(stream.size, s.seq_len)
    if rows_per_epoch < 1:
        raise ValueError(
            f"train.seq_len={s.seq_len} is too long for the train split of "
            f"data.source={s.source!r} ({stream.size} tokens); use at most "
            f"{max(1, (stream.size - 1) // 2)}."
        )
    shuffle_seed, offset_seed = _data_seeds(s.seed)
    pad_id = tokenizers.get_tokenizer(s.tokenizer).pad_id
    dataset = (
        grain.MapDataset.range(rows_per_epoch)
        .shuffle(seed=shuffle_seed)
        .repeat()  # reseeds the shuffle every epoch
        .map_with_index(_EpochRows(stream, s.seq_len, rows_per_epoch, offset_seed))
        # Local batches in global order; process p takes every process_count-th one, so
        # global batch t is local batches t * process_count + (0, 1, ...) in process order.
        .batch(s.local_batch, drop_remainder=True)
        .slice(slice(s.process_index, None, s.process_count))
        .map(functools.partial(_to_batch, pad_id=pad_id))
    )
    return iter(dataset.to_iter_dataset(_READ_OPTIONS))


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
    config, split: str, *, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """Returns this process's batches covering `split` once, in order, with fixed shapes."""
    s = _settings(config, process_index, process_count)
    if split not in sources.SPLITS:
        raise ValueError(f"Unknown split {split!r}; allowed: {', '.join(sources.SPLITS)}.")
    steps = _eval_steps(config)
    stream = _split_stream(s.source, s.tokenizer, split)
    pad_id = tokenizers.get_tokenizer(s.tokenizer).pad_id
    return _eval_iterator(stream, s, steps, pad_id)


def _eval_iterator(stream: np.ndarray, s: _Settings, steps: int, pad_id: int) -> Iterator[Batch]:
    # Row k holds tokens [k * L, k * L + L]: consecutive rows share one token, so every token
    # after the first is a target exactly once. Rows past the end are PAD with mask 0.
    seq_len, n = s.seq_len, stream.size
    num_rows = -(-(n - 1) // seq_len) if n > 1 else 0
    num_batches = -(-num_rows // s.global_batch)
    if steps > 0:
        num_batches = min(num_batches, steps)
    positions = np.arange(seq_len + 1)
    local_rows = s.process_index * s.local_batch + np.arange(s.local_batch)
    for step in range(num_batches):
        index = (step * s.global_batch + local_rows)[:, None] * seq_len + positions
        rows = np.where(index < n, stream[np.minimum(index, n - 1)], pad_id).astype(np.int32)
        yield _to_batch(rows, pad_id)
