"""Tests for jtrain.data: tokenizer, sources, mixtures, training and evaluation pipelines."""

import gzip
import hashlib
import importlib.util
import itertools
import json
import pathlib
from pydoc_data.topics import topics

import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from jtrain.data import embedded, pipeline, sources, token_rows, tokenizers

_CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
TOK = tokenizers.ByteTokenizer()


def make_config(batch_size=4, seq_len=32, seed=0, eval_steps=-1, packing=True, source=None):
    spec = importlib.util.spec_from_file_location("default_config", _CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.seed = seed
    config.train.batch_size = batch_size
    config.train.seq_len = seq_len
    config.eval.steps = eval_steps
    config.data.packing = packing
    config.data.prefetch = 0  # deterministic either way; tests that need prefetch set it
    if source is not None:
        config.data.source = source
    return config


def split_token_counts(config) -> dict[str, int]:
    """Tokens in each split of the config's data (summed over a mixture's sources)."""
    settings = pipeline._settings(config, 0, 1)
    return {s: pipeline._split_examples(settings, s).num_tokens for s in sources.SPLITS}


def split_stream(split):
    """The pydoc_topics split as one byte-token stream (BOS ... EOS per document)."""
    spec = sources.SourceSpec("named", "pydoc_topics")
    return sources.load_documents(spec, split, "byte", "text").stream


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def train_stream():
    return split_stream("train")


def find_row(stream_bytes, row):
    """Returns the token position of `row` in the stream, or -1."""
    at = stream_bytes.find(row.astype("<i4").tobytes())
    assert at % 4 == 0
    return at // 4


# Tokenizer.


@pytest.mark.parametrize("text", ["", "hello, world", "héllo — 你好 🙂\n\ttabs"])
def test_byte_tokenizer_round_trip(text):
    ids = TOK.encode(text)
    assert ids.dtype == np.int32
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
    np.testing.assert_array_equal(ids[1:-1], list(text.encode("utf-8")))
    assert TOK.decode(ids) == text
    assert TOK.decode(TOK.encode(text, add_bos=False, add_eos=False)) == text
    assert TOK.encode(text, add_bos=False, add_eos=False).size == len(text.encode("utf-8"))


def test_byte_tokenizer_specials():
    assert (TOK.vocab_size, TOK.pad_id, TOK.bos_id, TOK.eos_id) == (259, 256, 257, 258)
    np.testing.assert_array_equal(TOK.encode("a", add_eos=False), [257, 97])
    np.testing.assert_array_equal(TOK.encode("a", add_bos=False), [97, 258])
    assert TOK.decode([257, 104, 256, 105, 258, 999, -3]) == "hi"
    assert TOK.decode(np.array([[104], [105]])) == "hi"
    assert TOK.decode([0xC3]) == "\ufffd"  # a truncated UTF-8 sequence


def test_get_tokenizer():
    assert isinstance(tokenizers.get_tokenizer("byte"), tokenizers.ByteTokenizer)
    with pytest.raises(ValueError, match="'bpe'.*allowed: byte"):
        tokenizers.get_tokenizer("bpe")


# Sources.


def test_split_of_known_values():
    # sha256-based, so these hold on every machine and under any PYTHONHASHSEED.
    known = {"": "val", "a": "train", "jtrain": "test", "über": "train", "calls": "test"}
    assert {key: sources.split_of(key) for key in known} == known
    assert sources.split_of("a", fractions=(0.0, 0.0, 1.0)) == "test"
    with pytest.raises(ValueError, match="summing to 1"):
        sources.split_of("a", fractions=(0.5, 0.5, 0.5))


def test_pydoc_topics_splits():
    docs = embedded.pydoc_topics()
    assert set(docs) == set(sources.SPLITS)
    assert sum(len(d) for d in docs.values()) == len(topics)  # each topic in exactly one split
    total = sum(len(text.encode()) for text in topics.values())
    for split in sources.SPLITS:
        in_split = set(docs[split])
        assert docs[split] == [topics[n] for n in sorted(topics) if topics[n] in in_split]
        assert sum(len(text.encode()) for text in docs[split]) >= 0.05 * total
    docs["train"].clear()  # callers get copies
    assert embedded.pydoc_topics()["train"]
    with pytest.raises(ValueError, match="'wiki'.*allowed: pydoc_topics"):
        sources.parse_spec("wiki")


def test_pydoc_topics_no_shared_paragraphs_across_splits():
    def paragraphs(texts):
        return {p.strip() for text in texts for p in text.split("\n\n") if len(p.strip()) >= 200}

    docs = embedded.pydoc_topics()
    train = paragraphs(docs["train"])
    assert not train & paragraphs(docs["val"])
    assert not train & paragraphs(docs["test"])
    assert not paragraphs(docs["val"]) & paragraphs(docs["test"])


def test_split_token_counts():
    counts = split_token_counts(make_config())
    for split, docs in embedded.pydoc_topics().items():
        assert counts[split] == sum(len(d.encode()) + 2 for d in docs)


# Training pipeline.


def test_train_batches_shapes_and_shift():
    config = make_config(batch_size=4, seq_len=32, packing=False)
    stream_bytes = train_stream().astype("<i4").tobytes()
    for batch in take(pipeline.make_train_iterator(config), 5):
        assert set(batch) == {"inputs", "targets", "loss_weight"}
        assert (
            batch["inputs"].shape == batch["targets"].shape == batch["loss_weight"].shape == (4, 32)
        )
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        assert batch["loss_weight"].dtype == np.float32
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        np.testing.assert_array_equal(batch["loss_weight"], 1.0)  # no PAD in the train stream
        for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
            row = np.concatenate([inputs, targets[-1:]])
            assert find_row(stream_bytes, row) >= 0  # a real slice of the train stream


def test_train_deterministic_per_seed():
    config = make_config(seed=3)
    first = take(pipeline.make_train_iterator(config), 4)
    assert_batches_equal(first, take(pipeline.make_train_iterator(config), 4))
    other = take(pipeline.make_train_iterator(make_config(seed=4)), 4)
    assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])


def test_train_epochs_cover_rows_in_new_order_and_offset():
    seq_len, batch_size, epochs = 4096, 2, 3
    row_len = seq_len + 1
    stream = train_stream()
    stream_bytes = stream.astype("<i4").tobytes()
    rows_per_epoch = token_rows.train_rows_per_epoch(stream.size, seq_len)
    num_batches = -(-epochs * rows_per_epoch // batch_size)
    config = make_config(batch_size, seq_len, packing=False)
    batches = take(pipeline.make_train_iterator(config), num_batches)
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in batches])
    orders, offsets = [], []
    for epoch in range(epochs):
        epoch_rows = rows[epoch * rows_per_epoch : (epoch + 1) * rows_per_epoch]
        # The corpus repeats some passages, so take the most common cut offset, then look
        # every row up among the rows cut at that offset.
        starts = [find_row(stream_bytes, row) for row in epoch_rows]
        offset = np.bincount(np.array(starts) % row_len).argmax()
        cut = stream[offset + np.arange(rows_per_epoch)[:, None] * row_len + np.arange(row_len)]
        index = {row.tobytes(): j for j, row in enumerate(cut)}
        order = [index[row.tobytes()] for row in epoch_rows]
        assert sorted(order) == list(range(rows_per_epoch))  # every row exactly once
        orders.append(order)
        offsets.append(offset)
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert len(set(offsets)) > 1


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("packing", [False, True])
def test_global_batch_independent_of_process_count(process_count, packing):
    config = make_config(batch_size=8, seq_len=16, seed=1, packing=packing)
    steps = 6
    single = take(pipeline.make_train_iterator(config), steps)
    locals_ = [
        take(
            pipeline.make_train_iterator(config, process_index=p, process_count=process_count),
            steps,
        )
        for p in range(process_count)
    ]
    for step in range(steps):
        for key in single[step]:
            assert locals_[0][step][key].shape[0] == 8 // process_count
            joined = np.concatenate([local[step][key] for local in locals_])
            np.testing.assert_array_equal(joined, single[step][key])


@pytest.mark.parametrize("packing, prefetch", [(False, 0), (True, 0), (True, 2)])
def test_train_state_restore_mid_epoch(packing, prefetch):
    config = make_config(batch_size=4, seq_len=64, seed=2, packing=packing)
    config.data.prefetch = prefetch
    iterator = pipeline.make_train_iterator(config)
    take(iterator, 7)
    state = iterator.get_state()
    expected = take(iterator, 5)
    restored = pipeline.make_train_iterator(config)
    restored.set_state(state)
    assert_batches_equal(take(restored, 5), expected)


# Evaluation.


@pytest.mark.parametrize("split", sources.SPLITS)
def test_eval_covers_split_once(split):
    config = make_config(batch_size=8, seq_len=100, packing=False)
    stream = split_stream(split)
    batches = list(pipeline.eval_batches(config, split))
    for batch in batches:
        assert (
            batch["inputs"].shape
            == batch["targets"].shape
            == batch["loss_weight"].shape
            == (8, 100)
        )
        assert batch["inputs"].dtype == np.int32 and batch["loss_weight"].dtype == np.float32
    mask = np.concatenate([b["loss_weight"] for b in batches]).reshape(-1)
    targets = np.concatenate([b["targets"] for b in batches]).reshape(-1)
    assert mask.sum() == stream.size - 1  # every token after the first is predicted once
    np.testing.assert_array_equal(targets[mask > 0], stream[1:])
    assert (targets[mask == 0] == TOK.pad_id).all()
    assert_batches_equal(batches, list(pipeline.eval_batches(config, split)))


def test_eval_steps_cap_and_processes():
    config = make_config(batch_size=4, seq_len=50, eval_steps=3)
    capped = list(pipeline.eval_batches(config, "val"))
    assert len(capped) == 3
    config.eval.steps = -1
    full = list(pipeline.eval_batches(config, "val"))
    assert len(full) > 3
    assert_batches_equal(capped, full[:3])
    halves = [
        list(pipeline.eval_batches(config, "val", process_index=p, process_count=2)) for p in (0, 1)
    ]
    assert len(halves[0]) == len(halves[1]) == len(full)
    for step, batch in enumerate(full):
        for key in batch:
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])


# Config errors.


@pytest.mark.parametrize(
    "field, value, match",
    [
        (
            "data.source",
            "wiki",
            r"data.source='wiki'.*'wiki' is not a known.*allowed: pydoc_topics",
        ),
        ("data.tokenizer", "bpe", r"data.tokenizer='bpe'.*allowed: byte"),
        ("train.seq_len", 0, r"train.seq_len must be an integer >= 1, got 0"),
        ("train.batch_size", 0, r"train.batch_size must be an integer >= 1"),
        ("train.seq_len", 10**7, r"train.seq_len=10000000 is too long.*at most"),
    ],
)
def test_bad_config_values(field, value, match):
    config = make_config(packing=False)  # with packing, any seq_len fits
    section, key = field.split(".")
    setattr(config[section], key, value)
    with pytest.raises(ValueError, match=match):
        pipeline.make_train_iterator(config)
    if field != "train.seq_len" or value < 1:  # a long seq_len is fine for evaluation
        with pytest.raises(ValueError, match=match):
            pipeline.eval_batches(config, "val")


@pytest.mark.parametrize("steps", [0, -2])
def test_bad_eval_steps(steps):
    with pytest.raises(ValueError, match=rf"eval.steps must be -1 .* got {steps}"):
        pipeline.eval_batches(make_config(eval_steps=steps), "val")


def test_bad_process_layout_and_split():
    config = make_config(batch_size=6)
    with pytest.raises(ValueError, match=r"batch_size=6.*divisible by the 4 processes"):
        pipeline.make_train_iterator(config, process_count=4)
    with pytest.raises(ValueError, match=r"process_index=2 must be < process_count=2"):
        pipeline.eval_batches(config, "val", process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"Unknown split 'dev'.*train, val, test"):
        pipeline.eval_batches(config, "dev")


# Prepared directories, raw files and mixtures.

MANIFEST_TOKENIZER = {"type": "byte", "path": "byte", "vocab_size": 259, "bos_id": 257,
                      "eos_id": 258, "pad_id": 256}  # fmt: skip


def random_texts(n, alphabet, seed, max_len=120):
    rng = np.random.default_rng(seed)
    letters = np.array(list(alphabet))
    return ["".join(rng.choice(letters, size=rng.integers(1, max_len))) for _ in range(n)]


def write_prepared(root, texts_by_split, shards=2, tokenizer=MANIFEST_TOKENIZER):
    """Writes a prepared directory as `python -m jtrain.data.prepare` does; returns its docs."""
    docs = {split: [TOK.encode(t) for t in texts] for split, texts in texts_by_split.items()}
    splits = {}
    for split, split_docs in docs.items():
        (root / split).mkdir(parents=True)
        bounds = np.linspace(0, len(split_docs), shards + 1).astype(int)
        for k in range(shards):
            path = root / split / f"shard-{k:05d}-of-{shards:05d}.array_record"
            writer = ArrayRecordWriter(str(path), "group_size:1")
            for doc in split_docs[bounds[k] : bounds[k + 1]]:
                writer.write(doc.astype("<i4").tobytes())
            writer.close()
        tokens = sum(d.size for d in split_docs)
        splits[split] = {"documents": len(split_docs), "tokens": tokens, "fingerprint": "test"}
    manifest = {"format": {"version": 1}, "splits": splits, "tokenizer": tokenizer}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return docs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two prepared datasets with disjoint alphabets, so a row shows which one it came from."""
    root = tmp_path_factory.mktemp("prepared")
    out = {}
    for name, alphabet in (("a", "abcdefghijklm "), ("b", "NOPQRSTUVWXYZ ")):
        texts = {s: random_texts(n, alphabet, seed=i) for i, (s, n) in
                 enumerate((("train", 300), ("val", 40), ("test", 30)))}  # fmt: skip
        out[name] = (root / name, write_prepared(root / name, texts))
    return out


def segments(batch):
    """Yields each packed segment's tokens: its inputs, and its last target if in the same."""
    rows = zip(
        batch["inputs"], batch["targets"], batch["segment_ids"], batch["loss_weight"], strict=True
    )
    for inputs, targets, seg, mask in rows:
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            last = targets[where[-1]] if mask[where[-1]] else []
            yield np.append(inputs[where], last).astype(np.int32)


def assert_covers_once(batches, docs):
    mask = np.concatenate([b["loss_weight"] for b in batches]).reshape(-1)
    targets = np.concatenate([b["targets"] for b in batches]).reshape(-1)
    assert mask.sum() == sum(d.size - 1 for d in docs)  # every target token exactly once
    expected = np.bincount(np.concatenate([d[1:] for d in docs]), minlength=TOK.vocab_size)
    np.testing.assert_array_equal(
        np.bincount(targets[mask > 0], minlength=TOK.vocab_size), expected
    )


def test_prepared_source_train_and_eval(prepared):
    path, docs = prepared["a"]
    config = make_config(batch_size=4, seq_len=32, source=f"prepared:{path}")
    counts = split_token_counts(config)
    assert counts == {s: sum(d.size for d in docs[s]) for s in sources.SPLITS}
    train_bytes = np.concatenate(docs["train"]).astype("<i4").tobytes()
    for batch in take(pipeline.make_train_iterator(config), 10):
        assert batch["inputs"].shape == batch["segment_ids"].shape == (4, 32)
        for chunk in segments(batch):  # every segment is a slice of one train document
            assert find_row(train_bytes, chunk) >= 0
            assert chunk.size == 33 or chunk[0] == TOK.bos_id or chunk[-1] == TOK.eos_id
    assert_covers_once(list(pipeline.eval_batches(config, "val")), docs["val"])


def test_prepared_source_unpacked(prepared):
    path, docs = prepared["a"]
    config = make_config(batch_size=4, seq_len=32, source=f"prepared:{path}", packing=False)
    stream_bytes = np.concatenate(docs["train"]).astype("<i4").tobytes()
    for batch in take(pipeline.make_train_iterator(config), 5):
        for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
            assert find_row(stream_bytes, np.append(inputs, targets[-1])) >= 0
    batches = list(pipeline.eval_batches(config, "val"))
    mask = np.concatenate([b["loss_weight"] for b in batches]).reshape(-1)
    targets = np.concatenate([b["targets"] for b in batches]).reshape(-1)
    np.testing.assert_array_equal(targets[mask > 0], np.concatenate(docs["val"])[1:])


def test_prepared_tokenizer_must_match(tmp_path):
    other = {**MANIFEST_TOKENIZER, "vocab_size": 32000, "path": "t.json"}
    write_prepared(tmp_path, {"train": ["abc"]}, tokenizer=other)
    config = make_config(source=f"prepared:{tmp_path}")
    with pytest.raises(ValueError, match=r"data.tokenizer='byte'.*does not match.*'t.json'"):
        pipeline.validate_data_config(config)


def test_files_source(tmp_path, caplog):
    texts = random_texts(60, "abc xyz", seed=5)
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[:40])]
    lines[3:3] = ["{not json", json.dumps({"body": "no text field"})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[40:55]))
    for i, text in enumerate(texts[55:]):
        (tmp_path / f"c{i}.txt").write_text(text)
    config = make_config(seq_len=16, source=f"files:{tmp_path}/*")
    with caplog.at_level("WARNING"):
        counts = split_token_counts(config)
    assert "skipped 2 records" in caplog.text and "a.jsonl:4" in caplog.text
    by_split = {s: [] for s in sources.SPLITS}
    for text in texts:
        by_split[sources.split_of(hashlib.sha256(text.encode()).hexdigest())].append(text)
    assert counts == {s: sum(len(t.encode()) + 2 for t in by_split[s]) for s in sources.SPLITS}
    batch = next(pipeline.make_train_iterator(config))
    assert batch["loss_weight"].sum() > 0
    val_docs = [TOK.encode(t) for t in by_split["val"]]
    assert_covers_once(list(pipeline.eval_batches(config, "val")), val_docs)


def row_sources(batch):
    """'a' or 'b' per row, from the alphabets of the prepared fixture."""
    upper = (batch["inputs"] >= ord("N")) & (batch["inputs"] <= ord("Z"))
    lower = (batch["inputs"] >= ord("a")) & (batch["inputs"] <= ord("m"))
    assert not (upper.any(1) & lower.any(1)).any()  # a row holds one source's documents
    return np.where(upper.any(1), "b", "a")


def test_mixture_proportions(prepared):
    spec = f"prepared:{prepared['a'][0]}=0.7,prepared:{prepared['b'][0]}=0.3"
    config = make_config(batch_size=8, seq_len=32, source=spec)
    rows = np.concatenate([row_sources(b) for b in take(pipeline.make_train_iterator(config), 50)])
    # Grain interleaves the sources deterministically by their integer proportions (233:100
    # here), so over N rows each count is within one row of N * weight: 1/400 + 0.1%.
    assert abs((rows == "a").mean() - 0.7) < 0.01
    assert (row_sources(take(pipeline.make_train_iterator(config), 1)[0]) == "b").any()


def test_mixture_restore_processes_and_eval(prepared):
    spec = f"prepared:{prepared['a'][0]}=2,pydoc_topics,prepared:{prepared['b'][0]}=0.5"
    config = make_config(batch_size=4, seq_len=48, seed=3, source=spec)
    config.data.prefetch = 2
    iterator = pipeline.make_train_iterator(config)
    take(iterator, 9)
    state = iterator.get_state()
    expected = take(iterator, 6)
    restored = pipeline.make_train_iterator(config)
    restored.set_state(state)
    assert_batches_equal(take(restored, 6), expected)
    halves = [
        take(pipeline.make_train_iterator(config, process_index=p, process_count=2), 15)
        for p in (0, 1)
    ]
    for step in range(9, 15):
        for key, value in expected[step - 9].items():
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, value)
    # Evaluation walks the sources' splits one after the other, in spec order.
    pydoc_val = [TOK.encode(t) for t in embedded.pydoc_topics()["val"]]
    docs = prepared["a"][1]["val"] + pydoc_val + prepared["b"][1]["val"]
    assert_covers_once(list(pipeline.eval_batches(config, "val")), docs)


def test_workers_give_the_same_batches_and_restore(prepared):
    spec = f"prepared:{prepared['a'][0]}=0.5,pydoc_topics=0.5"
    config = make_config(batch_size=4, seq_len=32, source=spec)
    expected = take(pipeline.make_train_iterator(config), 10)
    config.data.workers, config.data.prefetch = 2, 2
    iterator = pipeline.make_train_iterator(config)
    assert_batches_equal(take(iterator, 5), expected[:5])
    state = iterator.get_state()
    iterator.close()
    restored = pipeline.make_train_iterator(config)
    restored.set_state(state)
    assert_batches_equal(take(restored, 5), expected[5:])
    restored.close()


@pytest.mark.parametrize("split", sources.SPLITS)
def test_packed_eval_covers_every_target_once(split):
    config = make_config(batch_size=6, seq_len=100)
    batches = list(pipeline.eval_batches(config, split))
    for batch in batches:
        assert set(batch) == {"inputs", "targets", "loss_weight", "segment_ids", "positions"}
        assert all(v.shape == (6, 100) for v in batch.values())
    assert_covers_once(batches, [TOK.encode(t) for t in embedded.pydoc_topics()[split]])
    assert_batches_equal(batches, list(pipeline.eval_batches(config, split)))
    halves = [
        list(pipeline.eval_batches(config, split, process_index=p, process_count=2)) for p in (0, 1)
    ]
    for step, batch in enumerate(batches):
        for key in batch:
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_packed_train_rows():
    config = make_config(batch_size=8, seq_len=64, seed=4)
    batches = take(pipeline.make_train_iterator(config), 20)
    stream_bytes = train_stream().astype("<i4").tobytes()
    for batch in batches:
        seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_weight"]
        starts = np.diff(seg, axis=1, prepend=0) != 0
        np.testing.assert_array_equal(pos == 0, starts | (seg == 0))  # positions restart
        # No loss across a boundary or on padding (the last column's target is not in the
        # batch's segment ids, so only padding decides it there).
        boundary = seg[:, 1:] != seg[:, :-1]
        np.testing.assert_array_equal(mask[:, :-1] == 0, boundary | (seg[:, :-1] == 0))
        assert (mask[seg == 0] == 0).all()
        for chunk in segments(batch):
            assert find_row(stream_bytes, chunk) >= 0
    other_seed = make_config(batch_size=8, seq_len=64, seed=5)
    other = take(pipeline.make_train_iterator(other_seed), 1)[0]
    assert not np.array_equal(batches[0]["inputs"], other["inputs"])


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("source", "", r"data.source='' is invalid: it must be a non-empty string"),
        ("source", "pydoc_topics,,x", r"empty item between commas"),
        ("source", "pydoc_topics=0", r"weight of 'pydoc_topics' must be a positive number"),
        ("source", "pydoc_topics=-1", r"must be a positive number.*allowed: pydoc_topics"),
        ("source", "pydoc_topics=nan", r"must be a positive number"),
        ("source", "prepared:", r"'prepared:' names no path"),
        ("source", "prepared:/no/such/dir", r"'/no/such/dir' is not a prepared dataset"),
        ("source", "files:/no/such/*.jsonl", r"matches no files; check the glob"),
        ("source", f"files:{_CONFIG_PATH}", r"default.py' is not one of .jsonl, .txt"),
        ("source", "pydoc_topics=1,wiki=2", r"'wiki' is not a known source"),
        ("packing", "yes", r"data.packing must be True or False, got 'yes'"),
        ("workers", -1, r"data.workers must be an integer >= 0, got -1"),
        ("prefetch", 1.5, r"data.prefetch must be an integer >= 0, got 1.5"),
        ("text_field", "", r"data.text_field must be a non-empty string"),
        ("tokenizer", "bpe", r"data.tokenizer='bpe' cannot be loaded.*allowed: byte"),
    ],
)
def test_bad_data_specs(key, value, match):
    config = make_config()
    # A fresh ConfigDict, so that values of the wrong type reach the validation.
    config.data = ml_collections.ConfigDict({**config.data.to_dict(), key: value})
    with pytest.raises(ValueError, match=match):
        pipeline.validate_data_config(config)
    with pytest.raises(ValueError, match=match):
        pipeline.make_train_iterator(config)


def test_prepared_format_errors(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": {"version": 2}}))
    with pytest.raises(ValueError, match=r"format version 2; this jtrain reads version 1"):
        pipeline.validate_data_config(make_config(source=f"prepared:{tmp_path}"))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": {"version": 1}}))
    with pytest.raises(ValueError, match=r"has no train shards"):
        pipeline.validate_data_config(make_config(source=f"prepared:{tmp_path}"))
