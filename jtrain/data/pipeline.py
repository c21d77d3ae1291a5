"""Grain input pipelines for language modelling on one source or a weighted mixture.

`config.data.source` names the documents (see `sources.parse_spec`); each source yields an
endless stream of rows of seq_len + 1 tokens:

- packed (`data.packing=True`): whole documents packed into rows with segment ids and
  positions (see `packing`), re-planned every epoch from the seed;
- unpacked: the documents as one BOS ... EOS stream, cut into non-overlapping rows at an offset
  that changes every epoch, rows shuffled per epoch.

With `task="sft"` the documents are chat examples with a loss weight per token (see `sft`):
packed whole (an example never spans rows), or one per row without packing; a target counts
only where it is a response token, in training and evaluation alike.

A mixture interleaves the sources' rows deterministically in proportion to their weights
(`grain.MapDataset.mix`), so weights are fractions of rows, i.e. of tokens. Rows are batched
with Grain, built in worker processes when `data.workers > 0` (`mp_prefetch`) and prefetched
in a background thread when `data.prefetch > 0`; every variant has the same batches and a
checkpointable state (`get_state`/`set_state`). Evaluation walks a split once, in order, with
fixed batch shapes; for a mixture it walks the concatenation of the sources' splits in spec
order.

Batches are numpy dicts of the process-local batch: rows [p*b, (p+1)*b) of the global batch,
with b = train.batch_size // process_count, so the global batch at a step does not depend on
how many processes read it, and each process reads only the documents of its own rows.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import hashlib
import weakref
from collections.abc import Iterator

import grain
import numpy as np

from jtrain.data import packing, sft, sources, tokenizers
from jtrain.data.documents import ConcatDocuments, Documents

Batch = dict[str, np.ndarray]  # inputs, targets: int32[b, L]; mask: float32[b, L]
# With packing also segment_ids, positions: int32[b, L].

# Building a row is microseconds of numpy: reading in the calling thread beats a thread pool,
# and the iterator state then sits exactly at the consumed position.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_MIN_SHM_BYTES = 1 << 20
_DEFAULTS = {
    "packing": True,
    "workers": 0,
    "prefetch": 2,
    "text_field": "text",
    "chat_template": "builtin",
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

    specs: tuple[sources.SourceSpec, ...]
    sft: bool  # task == "sft": documents are chat examples with loss weights
    chat_template: str
    source: str
    tokenizer: str
    pad_id: int
    text_field: str
    packing: bool
    workers: int
    prefetch: int
    seed: int
    seq_len: int
    global_batch: int
    local_batch: int
    process_index: int
    process_count: int

    @property
    def segmented(self) -> bool:
        """Rows built by jtrain.data.packing: packed documents, or one SFT example a row."""
        return self.packing or self.sft


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


def validate_data_config(config) -> None:
    """Raises a ValueError naming the `data.*` key whose value cannot work (fast: no reads)."""
    _validated(config)


def _is_sft(config) -> bool:
    return config.get("task") == "sft"


def _validated(config) -> tuple[tuple[sources.SourceSpec, ...], tokenizers.Tokenizer]:
    tokenizer = _get_tokenizer(config.data.tokenizer)
    if _is_sft(config):
        template = _data_key(config, "chat_template")
        specs = sft.validate(config.data.source, config.data.tokenizer, template)
    else:
        specs = sources.parse_spec(config.data.source)
    for spec in specs:
        if spec.kind == "prepared":
            manifest = sources.read_manifest(config.data.source, spec.target)
            sources.check_tokenizer(
                config.data.source, spec.target, manifest, config.data.tokenizer, tokenizer
            )
        elif spec.kind == "files":
            sources.text_files(config.data.source, spec.target)
    packing_ = _data_key(config, "packing")
    if not isinstance(packing_, (bool, np.bool_)):
        raise ValueError(f"data.packing must be True or False, got {packing_!r}.")
    for key in ("workers", "prefetch"):
        _check_int(f"data.{key}", _data_key(config, key), 0)
    text_field = _data_key(config, "text_field")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"data.text_field must be a non-empty string, got {text_field!r}.")
    return specs, tokenizer


def _settings(config, process_index: int, process_count: int) -> _Settings:
    specs, tokenizer = _validated(config)
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
        specs=specs,
        sft=_is_sft(config),
        chat_template=_data_key(config, "chat_template"),
        source=config.data.source,
        tokenizer=config.data.tokenizer,
        pad_id=int(tokenizer.pad_id),
        text_field=_data_key(config, "text_field"),
        packing=bool(_data_key(config, "packing")),
        workers=int(_data_key(config, "workers")),
        prefetch=int(_data_key(config, "prefetch")),
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


def _split_stream(source: str, tokenizer: str, split: str) -> np.ndarray:
    """The token stream of `split` of a registered source (read-only, cached)."""
    return sources.load_documents(sources.SourceSpec("named", source), split, tokenizer, "").stream


def _documents(s: _Settings, spec: sources.SourceSpec, split: str) -> Documents:
    if s.sft:
        return sft.load_examples(spec, split, s.tokenizer, s.chat_template, s.seq_len)
    return sources.load_documents(spec, split, s.tokenizer, s.text_field)


def _split_documents(s: _Settings, split: str) -> Documents:
    parts = [_documents(s, spec, split) for spec in s.specs]
    return parts[0] if len(parts) == 1 else ConcatDocuments(parts)


def split_token_counts(config) -> dict[str, int]:
    """Returns the number of tokens in each split (summed over a mixture's sources)."""
    s = _settings(config, 0, 1)
    return {split: _split_documents(s, split).num_tokens for split in sources.SPLITS}


def _to_batch(rows: np.ndarray, lengths: np.ndarray | None = None) -> Batch:
    """Turns int32[b, L + 1] rows into next-token inputs, targets and a loss mask.

    `lengths` holds each row's count of real tokens (the rest is padding); None = all real.
    The mask comes from positions, not from matching PAD, since many tokenizers use their
    EOS id as PAD and EOS must still be learned.
    """
    targets = np.ascontiguousarray(rows[:, 1:])
    if lengths is None:
        mask = np.ones(targets.shape, np.float32)
    else:
        mask = (np.arange(1, rows.shape[1]) < lengths[:, None]).astype(np.float32)
    return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": targets, "mask": mask}


def _data_seeds(seed: int, source_index: int = 0) -> tuple[int, int]:
    """Returns (shuffle seed, cut-offset seed) of a mixture's source, both in [0, 2**32)."""
    # Grain reseeds epoch e with shuffle seed + e; hashing the config seed keeps runs with
    # seeds s and s + 1 from replaying the same row orders one epoch apart.
    entropy = [seed % 2**64, 0x6A747261696E] + ([source_index] if source_index else [])
    state = np.random.SeedSequence(entropy).generate_state(2)
    return int(state[0]), int(state[1])


class _EpochRows:
    """Maps (global row index, row within its epoch) to seq_len + 1 tokens of the stream."""

    def __init__(self, documents, seq_len: int, rows_per_epoch: int, offset_seed: int):
        self._documents = documents
        self._row_len = seq_len + 1
        self._rows_per_epoch = rows_per_epoch
        self._offset_seed = offset_seed

    def offset(self, epoch: int) -> int:
        """Returns where epoch `epoch` starts cutting rows, in [0, seq_len]."""
        digest = hashlib.sha256(f"{self._offset_seed}:{epoch}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % self._row_len

    def __call__(self, index: int, row: int) -> np.ndarray:
        start = self.offset(index // self._rows_per_epoch) + row * self._row_len
        return self._documents.take(start, self._row_len)


def train_rows_per_epoch(num_tokens: int, seq_len: int) -> int:
    """Returns how many rows every epoch has, whatever its cut offset in [0, seq_len]."""
    return max(0, (num_tokens - seq_len) // (seq_len + 1))


def _source_rows(s: _Settings, index: int, spec: sources.SourceSpec) -> grain.MapDataset:
    """The endless row stream of one source of the mixture."""
    documents = _documents(s, spec, "train")
    shuffle_seed, offset_seed = _data_seeds(s.seed, index)
    where = f"the train split of {spec}" + (f" in data.source={s.source!r}" if index else "")
    if s.segmented and not (documents.lengths >= 2).any():
        raise ValueError(f"{where} has no document with 2 or more tokens; check the data.")
    if s.packing:
        rows = packing.EpochRows(documents, s.seq_len, shuffle_seed, s.pad_id)
        return grain.MapDataset.range(np.iinfo(np.int64).max).map(rows)
    if s.sft:  # one example per row, padded; examples shuffled every epoch
        plan = packing.example_plan(documents.lengths)
        return (
            grain.MapDataset.range(plan.num_rows)
            .shuffle(seed=shuffle_seed)
            .repeat()
            .map(packing.PlanRows(plan, documents, s.seq_len, s.pad_id))
        )
    rows_per_epoch = train_rows_per_epoch(documents.num_tokens, s.seq_len)
    if rows_per_epoch < 1:
        raise ValueError(
            f"train.seq_len={s.seq_len} is too long for {where} ({documents.num_tokens} "
            f"tokens) with data.packing=False; use at most "
            f"{max(1, (documents.num_tokens - 1) // 2)}, or data.packing=True."
        )
    return (
        grain.MapDataset.range(rows_per_epoch)
        .shuffle(seed=shuffle_seed)
        .repeat()  # reseeds the shuffle every epoch
        .map_with_index(_EpochRows(documents, s.seq_len, rows_per_epoch, offset_seed))
    )


def train_dataset(config, *, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Returns this process's endless training batches as a Grain MapDataset (index = step)."""
    s = _settings(config, process_index, process_count)
    row_sets = [_source_rows(s, k, spec) for k, spec in enumerate(s.specs)]
    rows = row_sets[0]
    if len(row_sets) > 1:
        rows = grain.MapDataset.mix(row_sets, [spec.weight for spec in s.specs])
    to_batch = packing.to_batch if s.segmented else _to_batch
    return (
        # Local batches in global order; process p takes every process_count-th one, so
        # global batch t is local batches t * process_count + (0, 1, ...) in process order.
        rows.batch(s.local_batch, drop_remainder=True)
        .slice(slice(s.process_index, None, s.process_count))
        .map(to_batch)
    )


def make_train_iterator(
    config, *, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator of this process's training batches."""
    dataset = train_dataset(config, process_index=process_index, process_count=process_count)
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
        iter_dataset = iter_dataset.mp_prefetch(options)
    if prefetch:
        iter_dataset = grain.experimental.ThreadPrefetchIterDataset(
            iter_dataset, prefetch_buffer_size=prefetch
        )
    iterator = iter(iter_dataset)
    _OPEN_ITERATORS.add(iterator)
    return iterator


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
    config, split: str, *, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """Returns this process's batches covering `split` once, in order, with fixed shapes.

    For a mixture, the split is the concatenation of every source's split in spec order, so
    each source counts by its size (not its weight). Padding rows have mask 0.
    """
    s = _settings(config, process_index, process_count)
    if split not in sources.SPLITS:
        raise ValueError(f"Unknown split {split!r}; allowed: {', '.join(sources.SPLITS)}.")
    steps = _eval_steps(config)
    documents = _split_documents(s, split)
    if s.segmented:
        return _packed_eval_iterator(documents, s, steps)
    return _eval_iterator(documents, s, steps)


def _local_rows(s: _Settings, step: int) -> np.ndarray:
    return step * s.global_batch + s.process_index * s.local_batch + np.arange(s.local_batch)


def _num_batches(num_rows: int, s: _Settings, steps: int) -> int:
    num_batches = -(-num_rows // s.global_batch)
    return min(num_batches, steps) if steps > 0 else num_batches


def _eval_iterator(documents, s: _Settings, steps: int) -> Iterator[Batch]:
    # Row k holds tokens [k * L, k * L + L]: consecutive rows share one token, so every token
    # after the first is a target exactly once. Rows past the end are PAD with mask 0.
    seq_len, n = s.seq_len, documents.num_tokens
    num_rows = -(-(n - 1) // seq_len) if n > 1 else 0
    for step in range(_num_batches(num_rows, s, steps)):
        rows = np.full((s.local_batch, seq_len + 1), s.pad_id, dtype=np.int32)
        lengths = np.zeros(s.local_batch, np.int64)
        for i, k in enumerate(_local_rows(s, step)):
            tokens = documents.take(int(k) * seq_len, seq_len + 1)
            rows[i, : tokens.size] = tokens
            lengths[i] = tokens.size
        yield _to_batch(rows, lengths)


def _packed_eval_iterator(documents, s: _Settings, steps: int) -> Iterator[Batch]:
    if s.packing:
        plan = packing.eval_plan(documents.lengths, s.seq_len)
    else:
        plan = packing.example_plan(documents.lengths)  # SFT: one example per row
    weights = packing.weights_fn(documents)
    for step in range(_num_batches(plan.num_rows, s, steps)):
        rows = _local_rows(s, step)
        yield packing.to_batch(
            packing.eval_rows(plan, rows, documents.doc, s.seq_len, s.pad_id, weights)
        )
