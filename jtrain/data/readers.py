"""Readers: records out of JSON Lines, Parquet and plain-text files, one reader for all uses.

`iter_file_rows` is the one file reader: it picks a format by extension (or `fmt`), undoes
gzip/zstd by suffix and streams a `Row` per record: a JSONL line's object, a Parquet row as a
dict of its columns, or a text file as `{text_key: contents}` (one per file, one per line with
text_mode="line", or pieces of whole lines with `chunk_bytes`). JSONL and text lines go a line
at a time, Parquet a record batch at a time, so inputs larger than memory are fine (text_mode
"file" holds a whole text file unless `chunk_bytes` is set). A record that cannot be read is
not dropped here: it comes out with `error` set ("malformed", "invalid_utf8") and a short
`reason`, so the caller can count and report it by `path:line`; a file that cannot be read on
(corrupt, truncated) raises a `DataError` naming it. Bytes are decoded with errors="strict"
(a codec's silent replacement would hide invalid UTF-8), Parquet strings checked likewise.
`iter_records` (for `jtrain.data.prepare`) builds on it: one text per record, taken from
`text_field`, with `ERRORS` naming why a record has none. Parquet and .zst need the
`prepare` extra (pyarrow, zstandard), imported on use.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import itertools
import json
import os
import sys
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from jtrain import extras
from jtrain.errors import DataError

ERRORS = ("malformed", "invalid_utf8", "missing_field", "non_string")
FORMATS = ("auto", "jsonl", "text", "parquet")
TEXT_MODES = ("file", "line")

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
_PARQUET_BATCH_ROWS = 1024
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some editors put first in a file


@dataclasses.dataclass(frozen=True)
class Row:
    """One record of a file as a dict, or the kind of error that kept it from being one."""

    value: dict | None
    path: str
    line: int  # 1-based line (JSONL, text); row for Parquet; 1 for a whole text file
    error: str | None = None  # "malformed" | "invalid_utf8"
    reason: str = ""  # a short human explanation of `error`
    nbytes: int = 0  # uncompressed input bytes the record came from, for MB/s

    @property
    def source(self) -> str:
        """Where the record is: "path:line"."""
        return f"{self.path}:{self.line}"


@dataclasses.dataclass(frozen=True)
class Record:
    """One raw document: its text, or the kind of error that kept it from having one."""

    text: str | None
    source: str  # "path:line"; for Parquet the 1-based row number, for text-file mode line 1
    error: str | None = None  # one of ERRORS
    reason: str = ""  # a short human explanation of `error`
    nbytes: int = 0  # uncompressed input bytes the record came from, for MB/s


def expand_inputs(patterns: list[str] | str) -> list[str]:
    """Returns the files `patterns` name (globs, directories walked), sorted per pattern."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: dict[str, None] = {}
    for pattern in patterns:
        if os.path.isdir(pattern):
            matched = [
                os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names
            ]
        else:
            matched = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matched:
            raise ValueError(f"Input pattern {pattern!r} matches no files; check the path.")
        files.update(dict.fromkeys(sorted(matched)))
    return list(files)


def _split_compression(path: str) -> tuple[str, str | None]:
    lower = path.lower()
    for suffix, kind in ((".gz", "gzip"), (".zst", "zstd"), (".zstd", "zstd")):
        if lower.endswith(suffix):
            return lower[: -len(suffix)], kind
    return lower, None


def detect_format(path: str) -> str:
    """Returns "jsonl", "parquet" or "text" from the file name, ignoring a .gz/.zst suffix."""
    stem, _ = _split_compression(path)
    if stem.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if stem.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def open_binary(path: str) -> BinaryIO:
    """Opens `path` for streaming binary reads, decompressing .gz and .zst on the fly."""
    _, compression = _split_compression(path)
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        zstandard = extras.need("zstandard", extra="prepare", use="reading .zst files")
        raw = open(path, "rb")  # noqa: SIM115 - closed with the reader below
        reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=True
        )
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - caller closes


def _decode(data: bytes, path: str, line: int) -> tuple[str | None, Row | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        column = e.start - data.rfind(b"\n", 0, e.start)  # 1-based, in bytes
        reason = f"invalid UTF-8 byte 0x{data[e.start]:02x} at column {column}"
        return None, Row(None, path, line, "invalid_utf8", reason, len(data))


def _jsonl_rows(path: str) -> Iterator[Row]:
    with open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(_BOM)
            line, bad = _decode(raw, path, line_no)
            if bad is not None:
                yield bad
                continue
            if not line.strip():
                continue  # a blank line holds no record (JSON Lines separators)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"bad JSON: {e.msg} (column {e.colno})"
                yield Row(None, path, line_no, "malformed", reason, len(raw))
                continue
            if not isinstance(obj, dict):
                reason = f"a JSON {type(obj).__name__}, not an object"
                yield Row(None, path, line_no, "malformed", reason, len(raw))
                continue
            yield Row(obj, path, line_no, nbytes=len(raw))


def _newlines(text: str, universal: bool) -> str:
    # Python's text mode (newline=None) reads CR LF and a lone CR as LF.
    return text.replace("\r\n", "\n").replace("\r", "\n") if universal else text


def _text_chunk_rows(
    f: BinaryIO, path: str, text_key: str, universal: bool, chunk_bytes: int
) -> Iterator[Row]:
    """A text file as rows of whole lines of about `chunk_bytes`; a bad line is an error row."""
    parts: list[str] = []
    first = size = 0  # the chunk's first line and its bytes
    for line_no, raw in enumerate(f, start=1):
        if line_no == 1:
            raw = raw.removeprefix(_BOM)
        text, bad = _decode(raw, path, line_no)
        if bad is None:
            first = first or line_no
            parts.append(text)
            size += len(raw)
        if parts and (bad is not None or size >= chunk_bytes):
            yield Row({text_key: _newlines("".join(parts), universal)}, path, first, nbytes=size)
            parts, first, size = [], 0, 0
        if bad is not None:
            yield bad
    if parts:
        yield Row({text_key: _newlines("".join(parts), universal)}, path, first, nbytes=size)


def _text_rows(
    path: str, text_mode: str, text_key: str, universal: bool, chunk_bytes: int | None
) -> Iterator[Row]:
    with open_binary(path) as f:
        if text_mode == "file" and chunk_bytes is not None:
            yield from _text_chunk_rows(f, path, text_key, universal, chunk_bytes)
            return
        if text_mode == "file":
            data = f.read().removeprefix(_BOM)
            try:
                text = _newlines(data.decode("utf-8"), universal)
                yield Row({text_key: text}, path, 1, nbytes=len(data))
            except UnicodeDecodeError as e:
                yield _decode(data, path, data.count(b"\n", 0, e.start) + 1)[1]
            return
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(_BOM)
            text, bad = _decode(raw, path, line_no)
            if bad is None:
                yield Row({text_key: _newlines(text, universal)}, path, line_no, nbytes=len(raw))
            else:
                yield bad


def _parquet_rows(path: str, columns: list[str] | None) -> Iterator[Row]:
    pq = extras.need("pyarrow.parquet", extra="prepare", use="reading Parquet files")
    import pyarrow as pa
    import pyarrow.compute as pc

    if _split_compression(path)[1] is not None:
        raise ValueError(f"{path}: Parquet compresses internally; decompress the file first.")
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    columns = names if columns is None else [c for c in columns if c in names]
    if not columns:  # none of the asked-for columns: every row is an empty record
        for row in range(1, pf.metadata.num_rows + 1):
            yield Row({}, path, row)
        return
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
        sizes = [0] * batch.num_rows  # the bytes of string and binary values, for MB/s
        for column in batch.columns:
            if (
                pa.types.is_string(column.type)
                or pa.types.is_large_string(column.type)
                or (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type))
            ):
                lengths = pc.binary_length(column).to_pylist()
                sizes = [s + (n or 0) for s, n in zip(sizes, lengths, strict=True)]
        for (value, reason), nbytes in zip(_batch_values(batch), sizes, strict=True):
            row += 1
            if value is None:
                yield Row(None, path, row, "invalid_utf8", reason, nbytes)
            else:
                yield Row(value, path, row, nbytes=nbytes)


def _batch_values(batch) -> list[tuple[dict | None, str]]:
    """(record, "") per row of a Parquet batch, or (None, why) for a row with a string that is
    not UTF-8: Arrow does not check strings on read, so one bad cell must not lose the batch."""
    try:
        return [(value, "") for value in batch.to_pylist()]
    except UnicodeDecodeError:
        pass
    out = []
    for i in range(batch.num_rows):  # cell by cell: only for a batch that holds a bad one
        value, reason = {}, ""
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            try:
                value[name] = column[i].as_py()
            except UnicodeDecodeError as e:
                reason = f"column {name!r}: invalid UTF-8 byte 0x{e.object[e.start]:02x}"
                break
        out.append((None, reason) if reason else (value, ""))
    return out


def check_options(text_mode: str, fmt: str) -> None:
    """Raises ValueError unless `text_mode` and `fmt` are known values."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}.")


def iter_file_rows(
    path: str,
    *,
    text_mode: str = "file",
    fmt: str = "auto",
    text_key: str = "text",
    columns: list[str] | None = None,
    universal_newlines: bool = False,
    chunk_bytes: int | None = None,
) -> Iterator[Row]:
    """Returns an iterator of one `Row` per record of the file `path` (no glob expansion).

    Text files give `{text_key: text}`; `columns` limits the Parquet columns read (default:
    all); `universal_newlines` reads CR LF and CR in text files as LF, as Python's text mode;
    `chunk_bytes` makes text_mode="file" give a text file as rows of whole lines of about that
    many bytes (each row's `line` is its first), so a large file is never all in memory.
    """
    check_options(text_mode, fmt)
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be None or >= 1, got {chunk_bytes!r}.")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "jsonl":
        rows = _jsonl_rows(path)
    elif kind == "parquet":
        rows = _parquet_rows(path, columns)
    else:
        rows = _text_rows(path, text_mode, text_key, universal_newlines, chunk_bytes)
    return _file_errors_named(path, kind, rows)


def _file_errors_named(path: str, kind: str, rows: Iterator[Row]) -> Iterator[Row]:
    """Re-raises a file that cannot be read on (corrupt, truncated) as a DataError naming it
    and the line it broke off after."""
    line = 0
    try:
        for row in rows:
            line = row.line
            yield row
    except _read_errors() as e:
        after = f" after line {line}" if line else ""
        error = "zlib.error" if isinstance(e, zlib.error) else type(e).__name__
        raise DataError(
            f"{path}: cannot read it as {kind}{after} ({error}: {e}); is it "
            "truncated, corrupt or misnamed? Fix or remove it, or set the format explicitly."
        ) from e


def _read_errors() -> tuple[type[Exception], ...]:
    """What reading a broken file raises: zstandard's and pyarrow's errors only where they
    are imported, since they are optional (and a file read with them has imported them)."""
    kinds = [OSError, EOFError, zlib.error]
    if sys.modules.get("zstandard") is not None:
        kinds.append(sys.modules["zstandard"].ZstdError)
    if sys.modules.get("pyarrow") is not None:
        kinds.append(sys.modules["pyarrow"].ArrowException)
    return tuple(kinds)


def _text_record(row: Row, text_field: str) -> Record:
    """The text of `row`'s `text_field`, or a Record saying why there is none."""
    source, nbytes = row.source, row.nbytes
    if row.error is not None:
        return Record(None, source, row.error, row.reason, nbytes)
    if text_field not in row.value:
        return Record(None, source, "missing_field", f"no field {text_field!r}", nbytes)
    value = row.value[text_field]
    if isinstance(value, bytes):  # a Parquet binary column: strict UTF-8, as for files
        value, bad = _decode(value, row.path, row.line)
        if bad is not None:
            return Record(None, source, bad.error, bad.reason, nbytes)
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        return Record(None, source, "non_string", f"field {text_field!r} is {kind}", nbytes)
    return Record(value, source, nbytes=nbytes)


def iter_file_records(
    path: str,
    *,
    text_field: str = "text",
    text_mode: str = "file",
    fmt: str = "auto",
    chunk_bytes: int | None = None,
) -> Iterator[Record]:
    """Returns an iterator of one `Record` per document of the file `path` (no glob expansion).

    `chunk_bytes` is as for `iter_file_rows`: a text file's "document" comes in pieces.
    """
    rows = iter_file_rows(
        path,
        text_mode=text_mode,
        fmt=fmt,
        text_key=text_field,
        columns=[text_field],
        chunk_bytes=chunk_bytes,
    )
    return (_text_record(row, text_field) for row in rows)


def iter_records(
    patterns: list[str] | str,
    *,
    text_field: str = "text",
    text_mode: str = "file",
    fmt: str = "auto",
) -> Iterator[Record]:
    """Returns an iterator of one `Record` per document of the files `patterns` match, in order.

    Unmatched patterns and bad options raise here, before anything is read.
    """
    check_options(text_mode, fmt)
    files = expand_inputs(patterns)
    return itertools.chain.from_iterable(
        iter_file_records(path, text_field=text_field, text_mode=text_mode, fmt=fmt)
        for path in files
    )
