"""Tests for jtrain.data.packing: chunking, first-fit rows, packed batches and their loss."""

import pickle

import jax
import numpy as np
import pytest
from flax import nnx

from jtrain.data import packing
from jtrain.models.transformer import Transformer, TransformerConfig
from jtrain.tasks.lm import token_cross_entropy

PAD = 256


def make_docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n).astype(np.int32) for n in lengths]


def packed_batch(docs, seq_len):
    plan = packing.eval_plan(np.array([d.size for d in docs]), seq_len)
    rows = packing.eval_rows(plan, range(plan.num_rows), docs.__getitem__, seq_len, PAD)
    return plan, packing.to_batch(rows)


def covered_targets(doc, start, length, lengths):
    """Per document, how many chunks predict each of its target tokens 1 .. n-1."""
    counts = [np.zeros(n, dtype=int) for n in lengths]
    for d, s, n in zip(doc, start, length, strict=True):
        counts[d][s + 1 : s + n] += 1
    return [c[1:] for c in counts]


@pytest.mark.parametrize("phase", [0, 1, 5, 7])
def test_chunks_cover_each_target_once(phase):
    seq_len = 8
    lengths = np.array([2, 5, 9, 10, 17, 18, 40, 1])
    order = np.arange(lengths.size)
    doc, start, length = packing.chunk_documents(
        lengths, order, seq_len, np.full(lengths.size, phase)
    )
    assert length.min() >= 2 and length.max() <= seq_len + 1
    for counts in covered_targets(doc, start, length, lengths):
        np.testing.assert_array_equal(counts, 1)  # every target exactly once
    # Documents that fit a row stay whole, whatever the phase.
    for d in np.flatnonzero((lengths >= 2) & (lengths <= seq_len + 1)):
        assert (doc == d).sum() == 1 and length[doc == d][0] == lengths[d]
    # Without a phase, a long document is cut at multiples of seq_len.
    if phase == 0:
        np.testing.assert_array_equal(start[doc == 6], [0, 8, 16, 24, 32])
        np.testing.assert_array_equal(length[doc == 6], [9, 9, 9, 9, 8])
    else:
        assert start[doc == 6][1] == phase and length[doc == 6][0] == phase + 1


def test_first_fit_respects_capacity_and_opens_rows_in_order():
    lengths = np.array([5, 9, 3, 12, 17, 4, 2, 6])
    row = packing.first_fit(lengths, capacity=17)
    np.testing.assert_array_equal(row, [0, 0, 0, 1, 2, 1, 3, 3])
    assert (np.bincount(row, weights=lengths) <= 17).all()
    # Closing the oldest row when too many are open bounds the scan but keeps rows valid.
    many = np.random.default_rng(0).integers(2, 18, size=500)
    for open_rows in (1, 4, 16):
        row = packing.first_fit(many, capacity=17, open_rows=open_rows)
        assert (np.bincount(row, weights=many) <= 17).all()
        assert row[0] == 0 and (np.diff(np.maximum.accumulate(row)) <= 1).all()


def test_packed_batch_segments_positions_and_mask():
    docs = make_docs([5, 9, 3, 12])
    plan, batch = packed_batch(docs, seq_len=16)
    assert plan.num_rows == 2
    assert batch["inputs"].shape == (2, 16) and batch["segment_ids"].dtype == np.int32
    # Row 0: documents of 5, 9 and 3 tokens fill all 17 tokens; row 1: 12 tokens + padding.
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 5 + [2] * 9 + [3] * 2)
    np.testing.assert_array_equal(batch["positions"][0], [*range(5), *range(9), 0, 1])
    np.testing.assert_array_equal(
        batch["inputs"][0], np.concatenate([docs[0], docs[1], docs[2]])[:-1]
    )
    # A target counts only inside its input's document: not across a boundary.
    np.testing.assert_array_equal(batch["loss_weight"][0], [1] * 4 + [0] + [1] * 8 + [0] + [1] * 2)
    np.testing.assert_array_equal(batch["segment_ids"][1], [1] * 12 + [0] * 4)
    np.testing.assert_array_equal(batch["positions"][1], [*range(12), 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_weight"][1], [1] * 11 + [0] * 5)
    np.testing.assert_array_equal(batch["targets"][1, 11:], PAD)
    # Every target token of every document exactly once.
    assert batch["loss_weight"].sum() == sum(d.size - 1 for d in docs)


def test_packed_row_gives_each_document_its_own_loss():
    cfg = TransformerConfig(
        vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
    )
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

    @jax.jit
    def token_nll(params, inputs, targets, positions=None, segment_ids=None):
        model = nnx.merge(graphdef, params)
        logits = model(inputs, positions_BxL=positions, segment_ids_BxL=segment_ids)
        return token_cross_entropy(logits, targets)

    docs = make_docs([7, 11, 4, 9, 13, 6], seed=1)
    seq_len = 24
    plan, batch = packed_batch(docs, seq_len)
    assert plan.num_rows < len(docs)  # documents did share rows
    packed = token_nll(
        params, batch["inputs"], batch["targets"], batch["positions"], batch["segment_ids"]
    )
    packed = np.asarray(packed) * batch["loss_weight"]
    # Each document alone in its own row, from position 0 with no segment ids; the PAD after
    # it cannot reach its tokens through causal attention.
    alone = np.full((len(docs), seq_len + 1), PAD, dtype=np.int32)
    for i, doc in enumerate(docs):
        alone[i, : doc.size] = doc
    alone_nll = np.asarray(token_nll(params, alone[:, :-1], alone[:, 1:]))
    for r in range(plan.num_rows):
        for segment, j in enumerate(range(plan.row_starts[r], plan.row_starts[r + 1]), start=1):
            d = plan.doc[j]
            expected = alone_nll[d, : docs[d].size - 1].sum()
            got = packed[r][batch["segment_ids"][r] == segment].sum()
            np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_epoch_plans_cover_every_target_once_and_change_per_epoch():
    lengths = np.random.default_rng(0).integers(1, 90, size=300)
    seq_len = 32
    plans = [packing.epoch_plan(lengths, seq_len, seed=7, epoch=e) for e in range(3)]
    for plan in plans:
        counts = covered_targets(plan.doc, plan.start, plan.length, lengths)
        assert all((c == 1).all() for c in counts)
        per_row = np.add.reduceat(plan.length, plan.row_starts[:-1])
        assert per_row.max() <= seq_len + 1
        assert per_row.sum() / (plan.num_rows * (seq_len + 1)) > 0.9  # rows are nearly full
    assert not np.array_equal(plans[0].doc, plans[1].doc)
    again = packing.epoch_plan(lengths, seq_len, seed=7, epoch=1)
    np.testing.assert_array_equal(again.doc, plans[1].doc)
    np.testing.assert_array_equal(again.start, plans[1].start)


class _Docs:
    def __init__(self, docs):
        self.docs = docs
        self.lengths = np.array([d.size for d in docs])

    def doc(self, i):
        return self.docs[i]


def test_epoch_rows_run_through_epochs():
    docs = make_docs(np.random.default_rng(1).integers(2, 40, size=50))
    rows = packing.EpochRows(_Docs(docs), seq_len=16, seed=3, pad_id=PAD)
    first = rows.plan(0).num_rows
    assert rows.locate(0) == (0, 0) and rows.locate(first - 1) == (0, first - 1)
    assert rows.locate(first) == (1, 0)
    total = sum(d.size - 1 for d in docs)
    targets = 0
    for i in range(first):
        row = rows(i)
        targets += int(
            (
                (row["segment_ids"][1:] == row["segment_ids"][:-1]) & (row["segment_ids"][:-1] > 0)
            ).sum()
        )
    assert targets == total  # one epoch of rows predicts every target once
    copy = pickle.loads(pickle.dumps(rows))  # as mp_prefetch sends it to workers
    for key in ("tokens", "segment_ids", "positions"):
        np.testing.assert_array_equal(copy(first + 3)[key], rows(first + 3)[key])
