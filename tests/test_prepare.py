"""Tests for offline data preparation: readers, cleaning, dedup and the prepare CLI."""

import gzip
import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from jtrain.data import cleaning, dedup, prepare, readers, tokenizers

REPO = pathlib.Path(__file__).resolve().parents[1]
TOK = tokenizers.get_tokenizer("byte")
_WORDS = [f"w{i}" for i in range(3000)]


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def good_docs(n: int, seed: int = 0) -> list[str]:
    """Distinct, clean documents."""
    return [f"Document {seed}-{i}: {words(1000 * seed + i, 12)}" for i in range(n)]


def write_jsonl(path, texts) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def read_split(out, split) -> list[np.ndarray]:
    """Returns the records of a split as int32 arrays, in shard order."""
    import grain

    paths = sorted(str(p) for p in (out / split).glob("shard-*.array_record"))
    if not paths:
        return []
    source = grain.sources.ArrayRecordDataSource(paths)
    return [np.frombuffer(source[i], dtype="<i4") for i in range(len(source))]


def split_texts(out) -> dict[str, list[str]]:
    return {s: [TOK.decode(ids) for ids in read_split(out, s)] for s in ("train", "val", "test")}


# The messy corpus: every kind of bad record, duplicates, near duplicates, every format.
LONG = words(7, 200)
LONG_NEAR = LONG.split()
LONG_NEAR[100] = "CHANGED"
LONG_NEAR = " ".join(LONG_NEAR)


def make_corpus(root: pathlib.Path) -> dict:
    """Writes the corpus under `root`; returns the expected counts and the kept texts."""
    root.mkdir()
    lines = [
        json.dumps({"text": "  Hello\tworld \r\n\r\n\r\n\r\nsecond  para  "}).encode(),  # 1 good
        b'{"text": "unterminated',  # 2 malformed
        b'{"text": "bad \xff byte"}',  # 3 invalid UTF-8
        json.dumps({"title": "no text"}).encode(),  # 4 missing field
        json.dumps({"text": 42}).encode(),  # 5 non-string
        json.dumps({"text": None}).encode(),  # 6 non-string
        json.dumps({"text": "  \x00 \t\n "}).encode(),  # 7 empty after cleaning
        json.dumps({"text": "Hello world\n\nsecond para"}).encode(),  # 8 duplicate of 1
        json.dumps({"text": "Caf\u00e9 au lait"}).encode(),  # 9 good
        json.dumps({"text": "Cafe\u0301 au lait\x07"}).encode(),  # 10 duplicate of 9 (NFC)
        b"   ",  # 11 blank: no record
        b"[1, 2]",  # 12 malformed: not an object
        json.dumps({"text": LONG}).encode(),  # 13 good
    ]
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    gz_docs = good_docs(20, seed=1) + [LONG_NEAR]  # the last: near duplicate of a.jsonl:13
    with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in gz_docs)
    zst_docs = good_docs(20, seed=2)
    data = "".join(json.dumps({"text": t}) + "\n" for t in zst_docs).encode()
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    (root / "d.txt").write_text("A plain text file.\nIts second line.\n", encoding="utf-8")
    (root / "e.txt").write_bytes(b"Good line.\nBad \xfe line.\n")  # invalid UTF-8 on line 2
    parquet_docs = good_docs(10, seed=3)
    table = pa.table({"text": [*parquet_docs, None, parquet_docs[0]], "id": list(range(12))})
    pq.write_table(table, root / "f.parquet")
    kept = [
        "Hello world\n\nsecond para",
        "Caf\u00e9 au lait",
        LONG,
        *gz_docs[:-1],
        *zst_docs,
        "A plain text file.\nIts second line.",
        *parquet_docs,
    ]
    counts = {
        "read": 12 + 21 + 20 + 2 + 12,
        "malformed": 2,
        "invalid_utf8": 2,
        "missing_field": 1,
        "non_string": 3,
        "empty": 1,
        "duplicates": 3,
        "near_duplicates": 1,
        "kept": len(kept),
    }
    return {"counts": counts, "kept": kept}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = make_corpus(root / "raw")
    out = root / "out"
    manifest = prepare.prepare([str(root / "raw" / "*")], str(out), near_dedup=True)
    return {"root": root, "raw": root / "raw", "out": out, "manifest": manifest, **expected}


def test_manifest_counts_every_kind(corpus):
    manifest = corpus["manifest"]
    assert manifest["documents"] == corpus["counts"]
    assert json.loads((corpus["out"] / "manifest.json").read_text()) == manifest
    assert sum(s["documents"] for s in manifest["splits"].values()) == len(corpus["kept"])
    assert manifest["format"]["record"] == "int32-le token ids, one document per record, BOS..EOS"
    assert manifest["format"]["version"] == 1
    assert manifest["tokenizer"]["vocab_size"] == TOK.vocab_size
    assert manifest["config"]["near_dedup"] is True
    assert manifest["config"]["splits"] == pytest.approx([0.8, 0.1, 0.1])


def test_examples_name_file_and_line(corpus):
    examples = corpus["manifest"]["examples"]
    raw = str(corpus["raw"])

    def sources(kind):
        return [e.split(": ", 1)[0] for e in examples[kind]]

    assert sources("malformed") == [f"{raw}/a.jsonl:2", f"{raw}/a.jsonl:12"]
    assert sources("invalid_utf8") == [f"{raw}/a.jsonl:3", f"{raw}/e.txt:2"]
    assert sources("missing_field") == [f"{raw}/a.jsonl:4"]
    assert sources("non_string") == [f"{raw}/a.jsonl:5", f"{raw}/a.jsonl:6", f"{raw}/f.parquet:11"]
    assert sources("empty") == [f"{raw}/a.jsonl:7"]
    assert sources("duplicates") == [f"{raw}/a.jsonl:8", f"{raw}/a.jsonl:10", f"{raw}/f.parquet:12"]
    assert sources("near_duplicates") == [f"{raw}/b.jsonl.gz:21"]
    assert f"near duplicate of {raw}/a.jsonl:13" in examples["near_duplicates"][0]
    assert "null" in examples["non_string"][1] and "int" in examples["non_string"][0]


def test_records_are_int32_bos_eos_and_decode_to_cleaned_text(corpus):
    texts = []
    for split in ("train", "val", "test"):
        records = read_split(corpus["out"], split)
        assert len(records) == corpus["manifest"]["splits"][split]["documents"]
        assert sum(len(r) for r in records) == corpus["manifest"]["splits"][split]["tokens"]
        for ids in records:
            assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
            assert not np.isin(ids[1:-1], [TOK.bos_id, TOK.eos_id]).any()
            texts.append(TOK.decode(ids))
    assert sorted(texts) == sorted(corpus["kept"])


def test_splits_are_disjoint_and_match_fingerprints(corpus):
    out, manifest = corpus["out"], corpus["manifest"]
    hashes = {}
    for split, texts in split_texts(out).items():
        hashes[split] = sorted(dedup.content_hash(t) for t in texts)
        listed = (out / "content_hashes" / f"{split}.txt").read_text().split()
        assert listed == hashes[split]
        fingerprint = prepare.hashlib.sha256("".join(h + "\n" for h in listed).encode())
        assert manifest["splits"][split]["fingerprint"] == fingerprint.hexdigest()
    train, val, test = (set(hashes[s]) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert all(manifest["splits"][s]["documents"] > 0 for s in ("train", "val", "test"))


def test_split_is_stable_under_shuffled_input(tmp_path):
    docs = good_docs(60)
    write_jsonl(tmp_path / "one.jsonl", docs)
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "z.jsonl", shuffled[:25])
    write_jsonl(tmp_path / "parts" / "a.jsonl", shuffled[25:] + shuffled[:3])  # 3 duplicates
    first = prepare.prepare(str(tmp_path / "one.jsonl"), str(tmp_path / "o1"))
    second = prepare.prepare(str(tmp_path / "parts"), str(tmp_path / "o2"))
    assert second["documents"]["duplicates"] == 3
    for split in ("train", "val", "test"):
        assert first["splits"][split] == second["splits"][split]
    a, b = split_texts(tmp_path / "o1"), split_texts(tmp_path / "o2")
    assert {s: sorted(t) for s, t in a.items()} == {s: sorted(t) for s, t in b.items()}
    assert a["train"] == [d for d in docs if d in set(a["train"])]  # input order kept


def test_shards_and_empty_splits(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", good_docs(23))
    manifest = prepare.prepare(
        str(tmp_path / "in.jsonl"), str(tmp_path / "out"), splits=(1, 0, 0), shard_docs=10
    )
    names = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    assert names == [f"shard-{i:05d}-of-00003.array_record" for i in range(3)]
    assert [s["documents"] for s in manifest["splits"].values()] == [23, 0, 0]
    for split in ("val", "test"):
        assert (tmp_path / "out" / split).is_dir()
        assert not list((tmp_path / "out" / split).iterdir())
        assert manifest["splits"][split]["shards"] == 0
    assert len(read_split(tmp_path / "out", "train")) == 23


def test_text_line_mode(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\ntwo\n  one  \nthree\n")
    manifest = prepare.prepare(str(tmp_path / "t.txt"), str(tmp_path / "out"), text_mode="line")
    counts = manifest["documents"]
    assert (counts["read"], counts["empty"], counts["duplicates"], counts["kept"]) == (5, 1, 1, 3)
    assert manifest["examples"]["empty"] == [f"{tmp_path}/t.txt:2: empty after cleaning"]
    assert sorted(sum(split_texts(tmp_path / "out").values(), [])) == ["one", "three", "two"]


def test_strict_stops_at_first_bad_record(corpus, tmp_path):
    with pytest.raises(prepare.BadRecordError, match=r"a\.jsonl:2: malformed"):
        prepare.prepare(str(corpus["raw"] / "*"), str(tmp_path / "out"), strict=True)
    assert os.listdir(tmp_path) == []  # neither OUT nor a temporary directory is left


def test_refuses_to_overwrite(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", good_docs(5))
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    prepare.prepare(str(tmp_path / "in.jsonl"), str(out))
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare.prepare(str(tmp_path / "in.jsonl"), str(out))
    write_jsonl(tmp_path / "in.jsonl", good_docs(7))
    manifest = prepare.prepare(str(tmp_path / "in.jsonl"), str(out), overwrite=True)
    assert manifest["documents"]["kept"] == 7
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out"]


@pytest.mark.parametrize(
    "splits", [(0.5, 0.5), (0.8, 0.1, 0.2), (1.1, -0.1, 0.0), ("a", "b", "c"), (0.7, 0.2)]
)
def test_bad_splits(tmp_path, splits):
    write_jsonl(tmp_path / "in.jsonl", good_docs(2))
    with pytest.raises(ValueError, match="--splits must be 3 non-negative numbers"):
        prepare.prepare(str(tmp_path / "in.jsonl"), str(tmp_path / "out"), splits=splits)


def test_unmatched_input_names_the_pattern(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\*\.jsonl"):
        prepare.prepare(str(tmp_path / "nothing*.jsonl"), str(tmp_path / "out"))


def test_cli_runs_and_prints_throughput(corpus, tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "jtrain.data.prepare",
        f"--input={corpus['raw']}/*.jsonl*",
        f"--input={corpus['raw']}/f.parquet",
        f"--output={out}",
        "--splits=0.8,0.1,0.1",
        "--near_dedup",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "throughput:" in result.stdout and "documents/s" in result.stdout
    assert "MB/s" in result.stdout and "docs/s" in result.stderr  # the progress line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"]["read"] == 12 + 21 + 20 + 12
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_clean():
    assert cleaning.clean("  a\tb\u00a0 c \r\n\r\n\r\n\r\nd\x00e  ") == "a b c\n\nde"
    assert cleaning.clean("Cafe\u0301") == "Caf\u00e9"
    assert cleaning.clean("def f():\n    return  1  \n") == "def f():\n    return 1"
    assert cleaning.clean("x\u2028y\x0cz\u2029w") == "x\ny\nz\n\nw"
    assert cleaning.clean("\ud800ok\x7f\x85") == "ok"
    rng = random.Random(0)
    alphabet = "ab \t\n\r\x00\x0b\u00a0\u0301e\u2028\u3000"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert cleaning.clean(cleaning.clean(text)) == cleaning.clean(text)


def test_minhash_lsh():
    lsh = dedup.MinHashLSH(threshold=0.8)
    docs = [words(i, 200) for i in range(50)]
    assert lsh.add_batch(range(50), docs) == [None] * 50
    near = docs[3].split()
    near[50] = "changed"
    assert not lsh.add_if_new("near", " ".join(near))
    assert lsh.last_match == 3 and lsh.last_similarity > 0.85
    far = docs[4].split()
    far[::4] = ["X"] * len(far[::4])  # a quarter of the words changed: Jaccard ~0.2
    assert lsh.add_if_new("far", " ".join(far))
    assert dedup.content_hash("é") == dedup.content_hash("\u00e9")
    assert dedup.optimal_bands(128, 0.8)[0] * dedup.optimal_bands(128, 0.8)[1] <= 128


def test_readers_formats(tmp_path):
    (tmp_path / "x.md").write_bytes(b"line one\nline \xc3\xa9 two\n")
    records = list(readers.iter_records(str(tmp_path / "x.md"), text_mode="line"))
    assert [(r.text, r.source) for r in records] == [
        ("line one\n", f"{tmp_path}/x.md:1"),
        ("line \u00e9 two\n", f"{tmp_path}/x.md:2"),
    ]
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "y.parquet")
    records = list(readers.iter_records(str(tmp_path / "y.parquet")))
    assert [(r.error, r.source) for r in records] == [
        ("missing_field", f"{tmp_path}/y.parquet:1"),
        ("missing_field", f"{tmp_path}/y.parquet:2"),
    ]
    (tmp_path / "z.data").write_text('{"text": "forced"}\n')
    records = list(readers.iter_records(str(tmp_path / "z.data"), fmt="jsonl"))
    assert [r.text for r in records] == ["forced"]


def test_readers_bom_and_corrupt_files(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n')
    assert [r.text for r in readers.iter_records(str(tmp_path / "bom.jsonl"))] == ["first"]
    data = gzip.compress(b'{"text": "a"}\n' * 1000)
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz: cannot read it as jsonl"):
        list(readers.iter_records(str(tmp_path / "cut.jsonl.gz")))
