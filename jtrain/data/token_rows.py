"""Rows of token documents: packed, cut from one stream, or one whole example per row.

Each source yields an endless stream of rows of seq_len + 1 tokens:

- packed (`data.packing=True`): whole documents packed into rows with segment ids and
  positions (see `packing`), re-planned every epoch from the seed;
- whole examples without packing (tasks that forbid cutting an example, e.g. SFT): one
  example per row, padded, examples shuffled every epoch;
- otherwise: the documents as one BOS ... EOS stream, cut into non-overlapping rows at an
  offset that changes every epoch, rows shuffled per epoch.

A target counts only where its loss weight is 1 (documents with per-token weights fold them
in), in training and evaluation alike. Evaluation walks a split once, in order: every target
token is counted exactly once.
"""

from __future__ import annotations

import hashlib

import grain
import numpy as np

from jtrain.data import packing, rows
from jtrain.data.documents import ConcatDocuments, Documents

Batch = dict[str, np.ndarray]


def stream_batch(row_tokens: np.ndarray, lengths: np.ndarray | None = None) -> Batch:
    """Turns int32[b, L + 1] rows into next-token inputs, targets and their loss weights.

    `lengths` holds each row's count of real tokens (the rest is padding); None = all real.
    The weight comes from positions, not from matching PAD, since many tokenizers use their
    EOS id as PAD and EOS must still be learned.
    """
    targets = np.ascontiguousarray(row_tokens[:, 1:])
    if lengths is None:
        weight = np.ones(targets.shape, np.float32)
    else:
        weight = (np.arange(1, row_tokens.shape[1]) < lengths[:, None]).astype(np.float32)
    inputs = np.ascontiguousarray(row_tokens[:, :-1])
    return {"inputs": inputs, "targets": targets, "loss_weight": weight}


class StreamRows:
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


def _segmented(r: rows.RowSettings) -> bool:
    """Rows built by jtrain.data.packing: packed documents, or one whole example a row."""
    return r.packing or r.whole_examples


class TokenRows:
    """The row builder of token `Documents`."""

    def train_rows(self, documents: Documents, r: rows.RowSettings, shuffle_seed, offset_seed):
        if _segmented(r) and not (documents.lengths >= 2).any():
            raise ValueError(f"{r.where} has no document with 2 or more tokens; check the data.")
        if r.packing:
            row_fn = packing.EpochRows(documents, r.seq_len, shuffle_seed, r.pad_id)
            return grain.MapDataset.range(np.iinfo(np.int64).max).map(row_fn)
        if r.whole_examples:  # one example per row, padded; examples shuffled every epoch
            plan = packing.example_plan(documents.lengths)
            return (
                grain.MapDataset.range(plan.num_rows)
                .shuffle(seed=shuffle_seed)
                .repeat()
                .map(packing.PlanRows(plan, documents, r.seq_len, r.pad_id))
            )
        rows_per_epoch = train_rows_per_epoch(documents.num_tokens, r.seq_len)
        if rows_per_epoch < 1:
            raise ValueError(
                f"train.seq_len={r.seq_len} is too long for {r.where} ({documents.num_tokens} "
                f"tokens) with data.packing=False; use at most "
                f"{max(1, (documents.num_tokens - 1) // 2)}, or data.packing=True."
            )
        return (
            grain.MapDataset.range(rows_per_epoch)
            .shuffle(seed=shuffle_seed)
            .repeat()  # reseeds the shuffle every epoch
            .map_with_index(StreamRows(documents, r.seq_len, rows_per_epoch, offset_seed))
        )

    def epoch_rows(self, documents: Documents, r: rows.RowSettings) -> int:
        # The split's tokens in rows of seq_len: exact for cut rows, close for packed ones.
        return max(1, -(-documents.num_tokens // r.seq_len))

    def collate(self, r: rows.RowSettings):
        return packing.to_batch if _segmented(r) else stream_batch

    def eval_rows(self, documents: Documents, r: rows.RowSettings):
        if _segmented(r):
            return self._segmented_eval(documents, r)
        # Row k holds tokens [k * L, k * L + L]: consecutive rows share one token, so every
        # token after the first is a target exactly once. Rows past the end are PAD, weight 0.
        seq_len, n = r.seq_len, documents.num_tokens
        num_rows = -(-(n - 1) // seq_len) if n > 1 else 0

        def make(indices: np.ndarray) -> Batch:
            row_tokens = np.full((indices.size, seq_len + 1), r.pad_id, dtype=np.int32)
            lengths = np.zeros(indices.size, np.int64)
            for i, k in enumerate(indices):
                tokens = documents.take(int(k) * seq_len, seq_len + 1)
                row_tokens[i, : tokens.size] = tokens
                lengths[i] = tokens.size
            return stream_batch(row_tokens, lengths)

        return num_rows, make

    def _segmented_eval(self, documents: Documents, r: rows.RowSettings):
        if r.packing:
            plan = packing.eval_plan(documents.lengths, r.seq_len)
        else:
            plan = packing.example_plan(documents.lengths)  # whole examples: one per row
        weights = packing.weights_fn(documents)

        def make(indices: np.ndarray) -> Batch:
            built = packing.eval_rows(plan, indices, documents.doc, r.seq_len, r.pad_id, weights)
            return packing.to_batch(built)

        return plan.num_rows, make

    def concat(self, parts):
        return ConcatDocuments(parts)


rows.register(Documents, TokenRows())
