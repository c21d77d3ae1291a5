"""Sequence packing: whole documents in fixed-length rows, with segment ids and positions.

A document of n tokens (BOS ... EOS) has n - 1 next-token targets. A document that fits a row
(n <= seq_len + 1) stays whole. A longer one is cut into chunks of at most seq_len + 1 tokens
that overlap by one token (a chunk's last token is the next chunk's first), so each of its
targets lands in exactly one chunk. Every chunk is its own segment: positions restart at 0
and attention stays inside it, as in the Flax lm1b and T5 packers. Chunks are packed into rows
of seq_len + 1 tokens by first-fit over a few open rows. A row's inputs are tokens[:-1], its
targets tokens[1:]; a target counts (mask 1) only where it is in the same segment as its
input, so no loss crosses a document boundary or lands on padding.

Weighted documents (SFT examples, never longer than a row) also carry a per-token loss
weight: rows then hold a `weights` beside the tokens, and a target counts only where its
weight is 1 as well. Plain documents have no such row, so their batches are unchanged.

Plans depend only on document lengths, so a process reads only the documents of its own rows.
Training re-plans every epoch from the seed: documents shuffled, long documents cut at a
random phase (chunk boundaries move between epochs, as the unpacked stream's cut offset
does), rows shuffled. Evaluation plans once: documents in order, phase 0, rows in order.
`example_plan` puts each document alone in its own row (SFT without packing).
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections.abc import Callable, Sequence

import numpy as np

Batch = dict[str, np.ndarray]
OPEN_ROWS = 16  # rows first-fit keeps open: more fills rows better and scans longer
_MIN_CHUNK = 2  # tokens: one input and its target


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which chunks fill each row: row r holds chunks row_starts[r] ... row_starts[r+1] - 1."""

    row_starts: np.ndarray  # int64[R + 1]
    doc: np.ndarray  # int64[C]: the chunk's document
    start: np.ndarray  # int64[C]: its first token within the document
    length: np.ndarray  # int64[C]: its tokens, 2 ... seq_len + 1

    @property
    def num_rows(self) -> int:
        """Rows in the plan."""
        return self.row_starts.size - 1


def chunk_documents(
    lengths: np.ndarray, order: np.ndarray, seq_len: int, phases: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cuts documents `order` (in that order) into chunks; returns (doc, start, length).

    Without a phase, cuts fall at seq_len, 2 * seq_len, ...; with phase p > 0 the first chunk
    holds tokens [0, p] and later cuts fall at p + k * seq_len. Documents that fit a row are
    never cut; documents of fewer than 2 tokens are dropped.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    phase = np.zeros_like(order) if phases is None else np.asarray(phases, dtype=np.int64)
    keep = lengths[order] >= _MIN_CHUNK  # a lone token predicts nothing
    order, phase = order[keep], phase[keep]
    targets = lengths[order] - 1
    phase = np.where(targets > seq_len, phase, 0)
    first_cut = np.where(phase > 0, phase, seq_len)
    cuts = np.where(targets > first_cut, (targets - 1 - first_cut) // seq_len + 1, 0)
    counts = cuts + 1
    doc = np.repeat(order, counts)
    k = np.arange(doc.size) - np.repeat(np.cumsum(counts) - counts, counts)
    first_cut, targets = np.repeat(first_cut, counts), np.repeat(targets, counts)
    start = np.where(k == 0, 0, first_cut + (k - 1) * seq_len)
    end = np.minimum(first_cut + k * seq_len, targets)  # the chunk's last token
    return doc, start, end - start + 1


def first_fit(lengths: np.ndarray, capacity: int, open_rows: int = OPEN_ROWS) -> np.ndarray:
    """Returns each chunk's row: the first open row with room, else a new one.

    Rows are numbered in the order of their first chunk. Full chunks skip the scan; when
    `open_rows` rows are open the oldest is closed, which bounds the work per chunk.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    row_key = np.arange(lengths.size)  # a row is keyed by its first chunk
    keys: list[int] = []
    free: list[int] = []
    partial = np.flatnonzero(lengths < capacity)
    for i, n in zip(partial.tolist(), lengths[partial].tolist(), strict=True):
        for slot, room in enumerate(free):
            if room >= n:
                row_key[i] = keys[slot]
                if room - n < _MIN_CHUNK:
                    del keys[slot], free[slot]
                else:
                    free[slot] = room - n
                break
        else:
            if len(keys) == open_rows:
                del keys[0], free[0]
            if capacity - n >= _MIN_CHUNK:
                keys.append(i)
                free.append(capacity - n)
    return np.unique(row_key, return_inverse=True)[1].reshape(-1)


def make_plan(
    doc: np.ndarray,
    start: np.ndarray,
    length: np.ndarray,
    row: np.ndarray,
    row_order: np.ndarray | None = None,
) -> Plan:
    """Groups chunks by row; row_order[k] is the row that becomes row k (default: as is)."""
    num_rows = int(row.max()) + 1 if row.size else 0
    if row_order is not None:
        rank = np.empty(num_rows, dtype=np.int64)
        rank[row_order] = np.arange(num_rows)
        row = rank[row]
    by_row = np.argsort(row, kind="stable")
    row_starts = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=num_rows), out=row_starts[1:])
    return Plan(row_starts, doc[by_row], start[by_row], length[by_row])


def epoch_plan(lengths: np.ndarray, seq_len: int, seed: int, epoch: int) -> Plan:
    """The training plan of one epoch: shuffled documents, random cut phases, shuffled rows."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(lengths.size)
    phases = rng.integers(0, seq_len, size=order.size)
    doc, start, length = chunk_documents(lengths, order, seq_len, phases)
    row = first_fit(length, seq_len + 1)
    num_rows = int(row.max()) + 1 if row.size else 0
    return make_plan(doc, start, length, row, rng.permutation(num_rows))


def eval_plan(lengths: np.ndarray, seq_len: int) -> Plan:
    """The evaluation plan: documents in order, cut at multiples of seq_len, rows in order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    doc, start, length = chunk_documents(lengths, np.flatnonzero(lengths >= _MIN_CHUNK), seq_len)
    return make_plan(doc, start, length, first_fit(length, seq_len + 1))


def example_plan(lengths: np.ndarray) -> Plan:
    """Each document of 2 or more tokens alone in its own row, in order (none may be cut)."""
    doc = np.flatnonzero(np.asarray(lengths, dtype=np.int64) >= _MIN_CHUNK)
    length = np.asarray(lengths, dtype=np.int64)[doc]
    return make_plan(doc, np.zeros_like(doc), length, np.arange(doc.size))


WeightsFn = Callable[[int], np.ndarray] | None


def build_row(
    plan: Plan,
    row: int,
    get_doc: Callable[[int], np.ndarray],
    seq_len: int,
    pad_id: int,
    get_weights: WeightsFn = None,
) -> Batch:
    """Returns row `row` of `plan` as int32 tokens, segment_ids, positions [seq_len + 1].

    With `get_weights` (a document's per-token loss weights) the row also has `weights`.
    """
    out = padding_row(seq_len, pad_id, weighted=get_weights is not None)
    at = 0
    lo, hi = plan.row_starts[row], plan.row_starts[row + 1]
    for segment, j in enumerate(range(lo, hi), start=1):
        start, n = int(plan.start[j]), int(plan.length[j])
        out["tokens"][at : at + n] = get_doc(int(plan.doc[j]))[start : start + n]
        out["segment_ids"][at : at + n] = segment
        out["positions"][at : at + n] = np.arange(n)
        if get_weights is not None:
            out["weights"][at : at + n] = get_weights(int(plan.doc[j]))[start : start + n]
        at += n
    return out


def padding_row(seq_len: int, pad_id: int, weighted: bool = False) -> Batch:
    """A row with no tokens: PAD, segment 0, so every target is masked."""
    row = {
        "tokens": np.full(seq_len + 1, pad_id, dtype=np.int32),
        "segment_ids": np.zeros(seq_len + 1, dtype=np.int32),
        "positions": np.zeros(seq_len + 1, dtype=np.int32),
    }
    if weighted:
        row["weights"] = np.zeros(seq_len + 1, dtype=np.float32)
    return row


def to_batch(rows: Batch) -> Batch:
    """Packed rows [b, L + 1] -> inputs, targets, loss_weight, segment_ids, positions [b, L].

    A row's `weights` (weighted documents) multiplies the loss weight at each target token.
    """
    tokens, segment_ids = rows["tokens"], rows["segment_ids"]
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    mask = (same & (segment_ids[:, :-1] > 0)).astype(np.float32)
    if "weights" in rows:
        mask *= rows["weights"][:, 1:]
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "loss_weight": mask,
        "segment_ids": np.ascontiguousarray(segment_ids[:, :-1]),
        "positions": np.ascontiguousarray(rows["positions"][:, :-1]),
    }


def weights_fn(documents) -> WeightsFn:
    """`documents.doc_weights` if its documents are weighted, else None."""
    return documents.doc_weights if getattr(documents, "weighted", False) else None


class PlanRows:
    """Row i of one fixed plan (SFT without packing: one example per row)."""

    def __init__(self, plan: Plan, documents, seq_len: int, pad_id: int):
        self._plan, self._documents = plan, documents
        self._seq_len, self._pad_id = seq_len, pad_id

    def __call__(self, row: int) -> Batch:
        get_weights = weights_fn(self._documents)
        return build_row(
            self._plan, row, self._documents.doc, self._seq_len, self._pad_id, get_weights
        )


class EpochRows:
    """An endless row source: row i of the concatenation of epochs 0, 1, ... of packed rows.

    Epochs have different row counts (packing depends on the order), so the row counts of
    earlier epochs are computed on first need and kept; the last two plans are cached.
    `documents` needs `lengths` and `doc(i)`, and `doc_weights(i)` if `weighted`.
    """

    def __init__(self, documents, seq_len: int, seed: int, pad_id: int):
        self._documents = documents
        self._seq_len = seq_len
        self._seed = seed
        self._pad_id = pad_id
        self._init_caches()

    def _init_caches(self) -> None:
        self._ends: list[int] = []  # rows before the end of epoch e
        self._plans: dict[int, Plan] = {}
        self._lock = threading.RLock()

    def __getstate__(self) -> dict:
        # Worker processes rebuild the caches; a lock does not pickle.
        state = self.__dict__.copy()
        for key in ("_ends", "_plans", "_lock"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def plan(self, epoch: int) -> Plan:
        """The plan of `epoch` (cached)."""
        with self._lock:
            if epoch not in self._plans:
                if len(self._plans) >= 2:
                    del self._plans[min(self._plans)]
                lengths = self._documents.lengths
                self._plans[epoch] = epoch_plan(lengths, self._seq_len, self._seed, epoch)
            return self._plans[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        """Returns (epoch, row within the epoch) of global row `index`."""
        with self._lock:
            while not self._ends or self._ends[-1] <= index:
                rows = self.plan(len(self._ends)).num_rows
                if rows == 0:
                    raise ValueError("a packed source has no document with a target token")
                self._ends.append((self._ends[-1] if self._ends else 0) + rows)
            epoch = bisect.bisect_right(self._ends, index)
            return epoch, index - (self._ends[epoch - 1] if epoch else 0)

    def __call__(self, index: int) -> Batch:
        epoch, row = self.locate(index)
        documents = self._documents
        plan = self.plan(epoch)
        return build_row(
            plan, row, documents.doc, self._seq_len, self._pad_id, weights_fn(documents)
        )


def eval_rows(
    plan: Plan,
    rows: Sequence[int],
    get_doc: Callable[[int], np.ndarray],
    seq_len: int,
    pad_id,
    get_weights: WeightsFn = None,
) -> Batch:
    """Stacks rows of an evaluation plan; indices past its end are padding rows."""
    built = [
        build_row(plan, r, get_doc, seq_len, pad_id, get_weights)
        if r < plan.num_rows
        else padding_row(seq_len, pad_id, weighted=get_weights is not None)
        for r in rows
    ]
    return {key: np.stack([row[key] for row in built]) for key in built[0]}
