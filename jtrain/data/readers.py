"""Readers: raw documents out of JSON Lines, plain-text and Parquet files, one `Record` each.

`iter_records` expands globs, picks a format by extension (or `fmt`), undoes gzip/zstd by
suffix and streams: JSONL and text-line files go a line at a time, Parquet a record batch at
a time, so inputs larger than memory are fine (text-file mode holds one document). A record
that cannot give a text is not dropped here: it comes out with `error` set to one of
`ERRORS` and a short `reason`, so the caller can count and report it. Bytes are decoded here
with errors="strict", because a codec's silent replacement would hide invalid UTF-8.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import itertools
import json
import os
from collections.abc import Iterator
from typing import BinaryIO

ERRORS = ("malformed", "invalid_utf8", "missing_field", "non_string")
FORMATS = ("auto", "jsonl", "text", "parquet")
TEXT_MODES = ("file", "line")

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_PARQUET_BATCH_ROWS = 1024
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some editors put first in a file


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
    if stem.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if stem.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def open_binary(path: str) -> BinaryIO:
    """Opens `path` for streaming binary reads, decompressing .gz and .zst on the fly."""
    _, compression = _split_compression(path)
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - closed with the reader below
        reader = zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=True
        )
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - caller closes


def _decode(data: bytes, source: str) -> tuple[str | None, Record | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        column = e.start - data.rfind(b"\n", 0, e.start)  # 1-based, in bytes
        reason = f"invalid UTF-8 byte 0x{data[e.start]:02x} at column {column}"
        return None, Record(None, source, "invalid_utf8", reason, len(data))


def _field_record(value, present: bool, text_field: str, source: str, nbytes: int) -> Record:
    if not present:
        return Record(None, source, "missing_field", f"no field {text_field!r}", nbytes)
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        return Record(None, source, "non_string", f"field {text_field!r} is {kind}", nbytes)
    return Record(value, source, nbytes=nbytes)


def _iter_jsonl(path: str, text_field: str) -> Iterator[Record]:
    with open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(_BOM)
            source = f"{path}:{line_no}"
            line, bad = _decode(raw, source)
            if bad is not None:
                yield bad
                continue
            if not line.strip():
                continue  # a blank line holds no record (JSON Lines separators)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(
                    None, source, "malformed", f"bad JSON: {e.msg} (column {e.colno})", len(raw)
                )
                continue
            if not isinstance(obj, dict):
                reason = f"a JSON {type(obj).__name__}, not an object"
                yield Record(None, source, "malformed", reason, len(raw))
                continue
            present = text_field in obj
            yield _field_record(obj.get(text_field), present, text_field, source, len(raw))


def _iter_text(path: str, text_mode: str) -> Iterator[Record]:
    with open_binary(path) as f:
        if text_mode == "file":
            data = f.read().removeprefix(_BOM)
            try:
                yield Record(data.decode("utf-8"), f"{path}:1", nbytes=len(data))
            except UnicodeDecodeError as e:
                line_no = data.count(b"\n", 0, e.start) + 1
                yield _decode(data, f"{path}:{line_no}")[1]
            return
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(_BOM)
            text, bad = _decode(raw, f"{path}:{line_no}")
            yield bad if bad is not None else Record(text, f"{path}:{line_no}", nbytes=len(raw))


def _iter_parquet(path: str, text_field: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if _split_compression(path)[1] is not None:
        raise ValueError(f"{path}: Parquet compresses internally; decompress the file first.")
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if text_field not in schema.names:
        reason = f"no column {text_field!r} (columns: {', '.join(schema.names)})"
        for row in range(1, pf.metadata.num_rows + 1):
            yield Record(None, f"{path}:{row}", "missing_field", reason)
        return
    column_type = schema.field(text_field).type
    is_text = pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
    is_bytes = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        column = batch.column(0)
        if not (is_text or is_bytes):
            reason = f"column {text_field!r} is {column_type}"
            for _ in range(len(column)):
                row += 1
                yield Record(None, f"{path}:{row}", "non_string", reason)
            continue
        sizes = pc.binary_length(column).to_pylist()
        for value, nbytes in zip(column.to_pylist(), sizes, strict=True):
            row += 1
            source = f"{path}:{row}"
            if is_bytes and value is not None:
                value, bad = _decode(value, source)
                if bad is not None:
                    yield bad
                    continue
            yield _field_record(value, True, text_field, source, nbytes or 0)


def check_options(text_mode: str, fmt: str) -> None:
    """Raises ValueError unless `text_mode` and `fmt` are known values."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}.")


def iter_file_records(
    path: str, *, text_field: str = "text", text_mode: str = "file", fmt: str = "auto"
) -> Iterator[Record]:
    """Returns an iterator of one `Record` per document of the file `path` (no glob expansion)."""
    check_options(text_mode, fmt)
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "jsonl":
        records = _iter_jsonl(path, text_field)
    elif kind == "parquet":
        records = _iter_parquet(path, text_field)
    else:
        records = _iter_text(path, text_mode)
    return _file_errors_named(path, kind, records)


def _file_errors_named(path: str, kind: str, records: Iterator[Record]) -> Iterator[Record]:
    """Re-raises a file that cannot be read at all (corrupt, truncated) as a ValueError."""
    import pyarrow as pa
    import zstandard

    try:
        yield from records
    except (OSError, EOFError, zstandard.ZstdError, pa.ArrowException) as e:
        raise ValueError(
            f"{path}: cannot read it as {kind} ({type(e).__name__}: {e}); is it truncated, "
            "corrupt or misnamed? Fix or remove it, or set the format explicitly."
        ) from e


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
