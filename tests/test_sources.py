"""Sources: the one file reader, record sets per split, per-split globs and python: sources."""

import functools
import gzip
import hashlib
import json
import logging
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from jtrain.data import embedded, readers, sources
from jtrain.data.records import BadRecord


def text_key(record: dict) -> str:
    """The LM key: sha256 of the "text" field; a BadRecord without one."""
    return sources.text_split_key("text", record)


def write_corpus(root) -> list[str]:
    """JSONL (plain, gz, zst), Parquet and text files with bad records; returns the good texts."""
    root.mkdir(exist_ok=True)
    lines = [
        b'\xef\xbb\xbf{"text": "first", "id": 1}',  # 1: a BOM, stripped
        b'{"text": "unterminated',  # 2 malformed
        b'{"text": "bad \xff byte"}',  # 3 invalid UTF-8
        b"[1, 2]",  # 4 malformed: not an object
        b"",  # 5 blank: no record
        b'{"title": "no text"}',  # 6 missing field (a bad record for the LM key)
        b'{"text": 7}',  # 7 non-string
        b'{"text": "second"}',  # 8
    ]
    (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": f"gz {i}"}) + "\n" for i in range(5)))
    data = "".join(json.dumps({"text": f"zst {i}"}) + "\n" for i in range(5)).encode()
    (root / "c.ndjson.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    table = pa.table({"text": ["pq 0", "pq 1", None], "n": [0, 1, 2]})
    pq.write_table(table, root / "d.parquet")
    (root / "e.txt").write_bytes(b"a text file\r\nwith two lines\n")
    with gzip.open(root / "f.md.gz", "wb") as f:
        f.write(b"markdown, gzipped")
    gz, zst = [f"gz {i}" for i in range(5)], [f"zst {i}" for i in range(5)]
    texts = ["first", "second", *gz, *zst, "pq 0", "pq 1"]
    return [*texts, "a text file\nwith two lines\n", "markdown, gzipped"]


def test_one_reader_gives_dicts_with_path_and_line(tmp_path):
    write_corpus(tmp_path / "raw")
    raw = tmp_path / "raw"
    rows = list(readers.iter_file_rows(str(raw / "a.jsonl")))
    assert [(r.line, r.error) for r in rows] == [
        (1, None),
        (2, "malformed"),
        (3, "invalid_utf8"),
        (4, "malformed"),
        (6, None),
        (7, None),
        (8, None),
    ]
    assert rows[0].value == {"text": "first", "id": 1} and rows[0].source == f"{raw}/a.jsonl:1"
    assert "not an object" in rows[3].reason and "0xff" in rows[2].reason
    rows = list(readers.iter_file_rows(str(raw / "d.parquet")))
    assert [r.value for r in rows] == [
        {"text": "pq 0", "n": 0},
        {"text": "pq 1", "n": 1},
        {"text": None, "n": 2},
    ]
    assert [r.value for r in readers.iter_file_rows(str(raw / "c.ndjson.zst"))][1] == {
        "text": "zst 1"
    }
    [row] = readers.iter_file_rows(str(raw / "e.txt"), text_key="body")
    assert row.value == {"body": "a text file\r\nwith two lines\n"}
    [row] = readers.iter_file_rows(str(raw / "e.txt"), universal_newlines=True)
    assert row.value == {"text": "a text file\nwith two lines\n"}
    lines = [
        r.value["text"] for r in readers.iter_file_rows(str(raw / "f.md.gz"), text_mode="line")
    ]
    assert lines == ["markdown, gzipped"]


def test_files_source_hashes_splits_and_counts_bad_records(tmp_path, caplog):
    texts = write_corpus(tmp_path / "raw")
    data = gzip.compress(b'{"text": "kept"}\n' * 1000)
    (tmp_path / "raw" / "g.jsonl.gz").write_bytes(data[: len(data) // 2])  # cut short
    spec = sources.SourceSpec("files", f"{tmp_path}/raw/*")
    with caplog.at_level(logging.WARNING, logger="jtrain.data.sources"):
        got = {s: sources.load_records(spec, s, text_key) for s in sources.SPLITS}
        sources.load_records(spec, "val", text_key)  # cached: no second warning
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"{tmp_path}/raw/a.jsonl:2: bad JSON" in warning
    skipped = got["train"].skipped
    counts = {"malformed": 2, "invalid_utf8": 1, "missing_field": 1, "non_string": 2}
    assert skipped.counts == {**counts, "unreadable": 1}
    assert f"skipped {skipped.total} records" in warning
    kept = sum(r["text"] == "kept" for s in sources.SPLITS for r in got[s])
    assert kept > 0  # the records before the cut stay
    texts += ["kept"] * kept
    by_split = {s: [] for s in sources.SPLITS}
    for text in texts:
        by_split[sources.split_of(hashlib.sha256(text.encode()).hexdigest())].append(text)
    assert {s: sorted(r["text"] for r in got[s]) for s in sources.SPLITS} == {
        s: sorted(t) for s, t in by_split.items()
    }
    wheres = {
        got[s][i]["text"]: got[s].where(i) for s in sources.SPLITS for i in range(len(got[s]))
    }
    assert wheres["second"] == f"{tmp_path}/raw/a.jsonl:8"
    assert wheres["pq 1"] == f"{tmp_path}/raw/d.parquet:2"
    assert sources.load_records(spec, "val", functools.partial(sources.text_split_key, "text")) is (
        sources.load_records(spec, "val", functools.partial(sources.text_split_key, "text"))
    )


def test_per_split_globs_are_not_hashed(tmp_path):
    for name in ("tr", "va"):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"text": f"{name} {i}"}) for i in range(20)] + ['{"x": 1}']
        (tmp_path / name / "part.jsonl").write_text("\n".join(lines) + "\n")
    target = f"train={tmp_path}/tr/*.jsonl; val={tmp_path}/va/*.jsonl"
    [spec] = sources.parse_spec(f"files:{target}")
    assert sources.split_globs(spec.target) == {
        "train": f"{tmp_path}/tr/*.jsonl",
        "val": f"{tmp_path}/va/*.jsonl",
    }
    sources.check(spec)
    got = {s: sources.load_records(spec, s, text_key) for s in sources.SPLITS}
    assert [r["text"] for r in got["train"]] == [f"tr {i}" for i in range(20)]
    assert [r["text"] for r in got["val"]] == [f"va {i}" for i in range(20)]
    assert len(got["test"]) == 0 and got["val"].skipped.counts == {"missing_field": 2}
    assert got["val"].where(3) == f"{tmp_path}/va/part.jsonl:4"
    assert sources.split_globs("data/year=2024/*.jsonl") is None  # "=" in a directory


@pytest.mark.parametrize(
    "spec, match",
    [
        ("files:train=a/*;dev=b/*", r"'dev' is not a split; name train, val or test"),
        ("files:train=a/*;train=b/*", r"split 'train' is named twice"),
        ("files:train=", r"split 'train' names no glob"),
        ("files:train=a/*;b/*", r"'b/\*' is not SPLIT=GLOB"),
        ("python:nodots", r"'python:nodots' is not python:module.path:function"),
        ("python:", r"'python:' names no path"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(
        ValueError, match=rf"data.source={re.escape(repr(spec))} is invalid: .*{match}"
    ):
        sources.parse_spec(spec)


def test_mixtures_with_weights_still_parse():
    specs = sources.parse_spec(
        "prepared:/data/web=0.7,pydoc_topics=0.3,files:train=a/*.jsonl;val=b/*.jsonl=2,"
        "python:my.records:load=0.5,files:data/year=2024/*.jsonl"
    )
    assert [(s.kind, s.target, s.weight) for s in specs] == [
        ("prepared", "/data/web", 0.7),
        ("named", "pydoc_topics", 0.3),
        ("files", "train=a/*.jsonl;val=b/*.jsonl", 2.0),
        ("python", "my.records:load", 0.5),
        ("files", "data/year=2024/*.jsonl", 1.0),
    ]
    assert str(specs[3]) == "python:my.records:load"


def test_check_files(tmp_path):
    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    (tmp_path / "b.pq").write_bytes(b"")
    sources.check(sources.SourceSpec("files", f"{tmp_path}/*"))
    (tmp_path / "c.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^data.source='files:.*c.png' is not one of .jsonl"):
        sources.check(sources.SourceSpec("files", f"{tmp_path}/*"))
    with pytest.raises(ValueError, match=r"^data.source='x': files:/no/\*.jsonl matches no files"):
        sources.check(sources.SourceSpec("files", "train=/no/*.jsonl"), "x")


MODULE = """
def records(split):
    return [{"text": f"{split} {i}"} for i in range({"train": 3, "val": 2, "test": 0}[split])]

def generator(split):
    yield {"text": split}

def not_dicts(split):
    return [{"text": "a"}, "b"]

not_callable = 3
"""


def test_python_source(tmp_path, monkeypatch):
    (tmp_path / "user_records.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    [spec] = sources.parse_spec("python:user_records:records")
    sources.check(spec)
    got = {s: sources.load_records(spec, s, text_key) for s in sources.SPLITS}
    assert [r["text"] for r in got["train"]] == ["train 0", "train 1", "train 2"]
    assert [len(got[s]) for s in sources.SPLITS] == [3, 2, 0]
    assert got["val"].where(1) == "python:user_records:records:val[1]"
    docs = sources.load_documents(spec, "val", "byte", "text")
    assert [len(docs.doc(i)) for i in range(len(docs))] == [7, 7]  # BOS "val i" EOS


@pytest.mark.parametrize(
    "target, match",
    [
        ("no_such_module:records", r"cannot import 'no_such_module' \(ModuleNotFoundError"),
        ("user_records:missing", r"has no function 'missing'; define missing\(split\)"),
        ("user_records:not_callable", r"has no function 'not_callable'"),
        ("user_records:generator", r"split 'train', the function returned a generator, not a"),
        ("user_records:not_dicts", r"split 'train', .* item 1 is a str, not a dict"),
    ],
)
def test_python_source_errors(tmp_path, monkeypatch, target, match):
    (tmp_path / "user_records.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_records", raising=False)
    spec = sources.SourceSpec("python", target)
    with pytest.raises(ValueError, match=rf"^data.source='python:{target}': .*{match}"):
        sources.load_records(spec, "train", text_key)


def test_bad_record_from_the_split_key_is_counted():
    def short_only(record):
        if len(record["text"]) > 2000:
            raise BadRecord("too_long", "more than 2000 characters")
        return record["text"]

    spec = sources.SourceSpec("named", "pydoc_topics")
    records = sources.load_records(spec, "val", short_only)
    assert 0 < len(records) < 7 and records.skipped.counts["too_long"] > 0
    assert records.skipped.examples[0].startswith("pydoc_topics:")


# Measured before the record-set refactor (CPython 3.11): the embedded sets' split sizes.
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="sizes measured on CPython 3.11")
@pytest.mark.parametrize(
    "name, sizes",
    [
        ("pydoc_topics", (64, 7, 8)),
        ("python_stdlib", (132, 16, 20)),
        ("python_docstrings", (1856, 266, 238)),
    ],
)
def test_embedded_sets_keep_their_splits(name, sizes):
    spec = sources.SourceSpec("named", name)
    got = [sources.load_records(spec, s, lambda r: "") for s in sources.SPLITS]
    assert tuple(len(r) for r in got) == sizes
    if name == "python_docstrings":
        assert set(got[0][0]) == {"prompt", "response"}
    else:
        texts = {"pydoc_topics": embedded.pydoc_topics, "python_stdlib": embedded.python_stdlib}
        assert [r["text"] for r in got[1]] == texts[name]()["val"]
    assert sources.source_names() == ("pydoc_topics", "python_stdlib")
    assert sources.source_names("chat") == ("arithmetic", "python_docstrings")
