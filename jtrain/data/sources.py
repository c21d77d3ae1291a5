"""Sources: what `data.source` names, and the records or token documents of each split.

`data.source` names one source or a weighted mixture (`parse_spec`, items separated by
commas, each with an optional trailing `=WEIGHT`). A source is one of:

- a registered record set (`records.register`): `pydoc_topics` and `python_stdlib`
  (`embedded.py`), `python_docstrings` (chat examples, `docstrings.py`), in every install;
- `files:GLOB`: JSON Lines (.jsonl/.json/.ndjson), Parquet (.parquet/.pq) or text files (one
  record per file), JSON and text optionally .gz/.zst, read with `readers`; each record goes to
  the split of a hash of its key (`split_of`);
- `files:train=GLOB;val=GLOB;test=GLOB`: a dataset that comes with its own splits; a split not
  named is empty and nothing is hashed. A glob may not contain ";" or ","; write "./" before a
  relative glob whose first directory looks like `train=...`;
- `python:module.path:function`: a user's records, `function(split)` returning a sequence of
  dicts (the working directory is importable, as for configs/);
- `prepared:DIR`: ArrayRecord shards of int32 token ids written by `jtrain.data.prepare`,
  the one kind whose records are already token ids.

`load_records` gives one split of a record source as `Records` (cached per process; bad
records skipped, counted and warned about once per source); `load_documents` gives the token
documents of one split for language modelling. `check` validates a source cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

# docstrings and embedded register their record sets on import.
from jtrain import user_code
from jtrain.data import arithmetic, docstrings, embedded, records  # noqa: F401
from jtrain.data.documents import ArrayRecordDocuments, Documents, InMemoryDocuments
from jtrain.data.records import SPLITS as SPLITS
from jtrain.data.records import BadRecord, Records, Skipped, SplitKey, registered, registered_names
from jtrain.data.records import register as register
from jtrain.data.records import split_of as split_of

_log = logging.getLogger(__name__)


def source_names(holds: str = "text") -> tuple[str, ...]:
    """Returns the registered record sets of `holds` records ("text" or "chat"), sorted."""
    return registered_names(holds)


# Source specs: what config.data.source names.

PREPARED, FILES, PYTHON = "prepared:", "files:", "python:"
# "supervised": a table or image set (jtrain.data.supervised), checked by its task.
_PREFIXES = {
    "named": "",
    "prepared": PREPARED,
    "files": FILES,
    "python": PYTHON,
    "supervised": "",
}
# Most common first: an error message lists them in this order.
_STEMS = (".jsonl", ".txt", ".json", ".ndjson", ".text", ".md")
FILE_SUFFIXES = tuple(s + c for s in _STEMS for c in ("", ".gz", ".zst", ".zstd")) + (
    ".parquet",
    ".pq",
)
_FILE_KINDS = f"{', '.join(_STEMS)}, .parquet, .pq; JSON and text optionally .gz or .zst"
_ALLOWED = (
    "{names}, prepared:DIR (a directory written by `python -m jtrain.data.prepare`), "
    f"files:GLOB ({_FILE_KINDS}; read on the fly), files:train=GLOB;val=GLOB;test=GLOB (a "
    "dataset's own splits), python:module.path:function (function(split) returns that split's "
    "records), or a weighted mixture such as 'prepared:/data/web=0.7,pydoc_topics=0.3'"
)
_SPLIT_GLOB = re.compile(r"\s*(\w+)\s*=(.*)", re.DOTALL)
_PYTHON_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One source of `data.source`: a set's name, a directory, a file glob or a function."""

    kind: str  # "named" | "prepared" | "files" | "python"
    target: str  # the name, the directory, the glob(s) or "module.path:function"
    weight: float = 1.0  # mixture weight (relative)

    def __str__(self) -> str:
        return f"{_PREFIXES[self.kind]}{self.target}"


def split_globs(target: str) -> dict[str, str] | None:
    """The globs of a `files:train=GLOB;val=GLOB` target by split, or None for one plain glob."""
    parts = [part for part in target.split(";") if part.strip()]
    first = _SPLIT_GLOB.fullmatch(parts[0]) if parts else None
    if len(parts) == 1 and ";" not in target and not (first and first.group(1) in SPLITS):
        return None  # a plain glob, perhaps with "=" in a directory name (year=2024/)
    globs: dict[str, str] = {}
    for part in parts:
        match = _SPLIT_GLOB.fullmatch(part)
        if not match:
            raise ValueError(f"{part.strip()!r} is not SPLIT=GLOB")
        split, pattern = match.group(1), match.group(2).strip()
        if split not in SPLITS:
            raise ValueError(f"{split!r} is not a split; name train, val or test")
        if split in globs:
            raise ValueError(f"split {split!r} is named twice")
        if not pattern:
            raise ValueError(f"split {split!r} names no glob")
        globs[split] = pattern
    return globs


def _bad_spec(spec, problem: str, names: Sequence[str] | None = None) -> ValueError:
    allowed = _ALLOWED.format(names=", ".join(source_names() if names is None else names))
    return ValueError(f"data.source={spec!r} is invalid: {problem}; allowed: {allowed}.")


def _parse_item(spec: str, item: str, names: Sequence[str] | None = None) -> SourceSpec:
    body, weight = item, 1.0
    head, sep, tail = item.rpartition("=")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            weight = 1.0  # an "=" inside a path or a split's glob, not a weight
        else:
            body = head.strip()
            if not (math.isfinite(weight) and weight > 0):
                raise _bad_spec(spec, f"the weight of {body!r} must be a positive number", names)
    for kind, prefix in (("prepared", PREPARED), ("files", FILES), ("python", PYTHON)):
        if body.startswith(prefix):
            target = body[len(prefix) :].strip()
            if not target:
                raise _bad_spec(spec, f"{body!r} names no path", names)
            if kind == "files":
                try:
                    split_globs(target)
                except ValueError as err:
                    raise _bad_spec(spec, f"in {body!r}, {err}", names) from None
            if kind == "python" and not _PYTHON_TARGET.fullmatch(target):
                raise _bad_spec(spec, f"{body!r} is not python:module.path:function", names)
            return SourceSpec(kind, target, weight)
    if body not in (source_names() if names is None else names):
        raise _bad_spec(spec, f"{body!r} is not a known source", names)
    return SourceSpec("named", body, weight)


def parse_spec(spec, names: Sequence[str] | None = None) -> tuple[SourceSpec, ...]:
    """Parses `data.source`: comma-separated sources, each with an optional `=weight`.

    `names` replaces the registered text sets as the names allowed (chat example sets).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _bad_spec(spec, "it must be a non-empty string", names)
    items = [item.strip() for item in spec.split(",")]
    if not all(items):
        raise _bad_spec(spec, "it has an empty item between commas", names)
    return tuple(_parse_item(spec, item, names) for item in items)


def parse_record_spec(spec, names: Sequence[str], records: str) -> tuple[SourceSpec, ...]:
    """Parses `data.source` for a task that reads records, not token documents (`prepared:`
    is refused); `records` says what they hold, for the message."""
    specs = parse_spec(spec, names=names)
    for item in specs:
        if item.kind == "prepared":
            raise ValueError(
                f"data.source={spec!r}: {item} holds token documents, not {records}; name JSON "
                "Lines or Parquet records (files:GLOB)."
            )
    return specs


def check(spec: SourceSpec, source: str | None = None) -> None:
    """Checks cheaply (no records read) that `spec` can load; `source` is all of data.source."""
    source = str(spec) if source is None else source
    if spec.kind == "supervised":
        return  # its task checks it with the keys it needs (data.target, data.features)
    if spec.kind == "files":
        text_files(source, spec.target)
    elif spec.kind == "python":
        _python_function(source, spec.target)
    elif spec.kind == "prepared":
        read_manifest(source, spec.target)
    elif spec.target not in {n for holds in records.HOLDS for n in source_names(holds)}:
        # Which kinds of records a task reads, its own parser says (parse_spec's names).
        raise _bad_spec(source, f"{spec.target!r} is not a known source")


def _matched_files(spec: str, pattern: str, suffixes: tuple[str, ...], hint: str) -> list[str]:
    paths = sorted(
        p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    if not paths:
        raise ValueError(
            f"data.source={spec!r}: {FILES}{pattern} matches no files; check the glob."
        )
    unknown = [p for p in paths if not p.lower().endswith(suffixes)]
    if unknown:
        kinds = _FILE_KINDS if suffixes == FILE_SUFFIXES else ", ".join(suffixes)
        raise ValueError(f"data.source={spec!r}: {unknown[0]!r} is not one of {kinds}; {hint}.")
    return paths


def text_files(
    spec: str,
    pattern: str,
    suffixes: tuple[str, ...] = FILE_SUFFIXES,
    hint: str = "narrow the glob, or prepare other formats with `python -m jtrain.data.prepare`",
) -> list[str]:
    """The files a `files:` target matches, sorted (all splits' for train=GLOB;val=GLOB).

    Raises a ValueError for a glob that matches nothing or a file of another suffix.
    """
    try:
        globs = split_globs(pattern)
    except ValueError as err:
        raise _bad_spec(spec, f"in {FILES}{pattern!r}, {err}") from None
    if globs is None:
        return _matched_files(spec, pattern, suffixes, hint)
    return sorted({p for g in globs.values() for p in _matched_files(spec, g, suffixes, hint)})


# Records: one split of a record source, cached per process.


def _identity(function: Callable):
    if isinstance(function, functools.partial):
        return (_identity(function.func), function.args, tuple(sorted(function.keywords.items())))
    return function


class _Key:
    """A split_key as a cache key: a functools.partial compares by function and arguments."""

    def __init__(self, function: SplitKey):
        self.function, self._identity = function, _identity(function)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Key) and self._identity == other._identity

    def __hash__(self) -> int:
        return hash(self._identity)


def load_records(spec: SourceSpec, split: str, split_key: SplitKey, *, text_key="text") -> Records:
    """Returns the records of `split` of one source (cached per process: do not mutate them).

    `split_key(record)` is the task's key: a plain `files:GLOB` record goes to
    `split_of(split_key(record))`; in every source, a record for which it raises a ValueError
    is bad: skipped and counted (by its `kind` attribute, if it has one). Text files give
    `{text_key: contents}`. For the cache to hit, pass a module-level function or a
    functools.partial of one.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; allowed: {', '.join(SPLITS)}.")
    if spec.kind == "prepared":
        raise ValueError(
            f"data.source={str(spec)!r} holds token ids, not records; use load_documents."
        )
    return _load(spec.kind, spec.target, _Key(split_key), text_key)[split]


@functools.cache
def _load(kind: str, target: str, key: _Key, text_key: str) -> dict[str, Records]:
    name, skipped = f"{_PREFIXES[kind]}{target}", Skipped()
    if kind == "files":
        globs = split_globs(target)
        if globs is None:
            files = {None: text_files(name, target)}  # None: split by the hash of each key
        else:
            files = {split: text_files(name, pattern) for split, pattern in globs.items()}
        out = records.from_files(name, files, key.function, text_key, skipped)
    else:
        function = registered(target) if kind == "named" else _python_function(name, target)
        out = records.from_function(name, function, key.function, skipped)
    if skipped.total:
        _log.warning("data.source %s: %s", name, skipped.summary())
    return out


def _python_function(source: str, target: str) -> Callable:
    """The function `module.path:function` names; a ValueError says what to fix."""
    module_name = target.rpartition(":")[0]
    try:
        module_name, function_name, function = user_code.attribute(target)
    except Exception as err:  # any failure to import is the user's to fix; say which
        raise ValueError(
            f"data.source={source!r}: cannot import {module_name!r} ({type(err).__name__}: "
            f"{err}); make it importable from {os.getcwd()} or PYTHONPATH."
        ) from err
    if not callable(function):
        raise ValueError(
            f"data.source={source!r}: module {module_name!r} has no function "
            f"{function_name!r}; define {function_name}(split) returning that split's records."
        )
    return function


# Token documents for language modelling.


def text_split_key(field: str, record: dict) -> str:
    """The language-modelling split key: the sha256 hex digest of the record's `field` text."""
    if field not in record:
        raise BadRecord("missing_field", f"no field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise BadRecord("non_string", f"field {field!r} is {kind}")
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def _encode_all(texts: Sequence[str], tokenizer) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(list(texts))]


@functools.cache
def _text_documents(kind: str, target: str, field: str, tokenizer: str, split: str):
    from jtrain.data import tokenizers

    key = functools.partial(text_split_key, field)
    records = load_records(SourceSpec(kind, target), split, key, text_key=field)
    texts = [record[field] for record in records]
    return InMemoryDocuments(_encode_all(texts, tokenizers.get_tokenizer(tokenizer)))


def load_documents(source: SourceSpec, split: str, tokenizer: str, text_field: str) -> Documents:
    """Returns the token documents of `split` of one source (cached per process)."""
    if source.kind == "prepared":
        return _prepared_documents(os.path.abspath(source.target), split)
    # Registered text sets hold {"text": ...} whatever data.text_field says.
    field = "text" if source.kind == "named" else text_field
    return _text_documents(source.kind, source.target, field, tokenizer, split)


# Prepared directories (written by jtrain.data.prepare).

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def prepared_shards(path: str, split: str) -> list[str]:
    """The ArrayRecord shards of `split` in prepared directory `path`, in order."""
    return sorted(glob.glob(os.path.join(path, split, "shard-*-of-*.array_record")))


def read_manifest(spec: str, path: str) -> dict:
    """Returns the manifest of prepared directory `path`, or raises a ValueError naming it."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(
            f"data.source={spec!r}: {path!r} is not a prepared dataset (no {MANIFEST}); "
            f"write one with `python -m jtrain.data.prepare`, or use files:GLOB for raw text."
        )
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"data.source={spec!r}: cannot read {manifest_path}: {err}.") from None
    version = manifest.get("format", {}).get("version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"data.source={spec!r}: {manifest_path} has format version {version!r}; this "
            f"jtrain reads version {FORMAT_VERSION}. Prepare the dataset again."
        )
    if not prepared_shards(path, "train"):
        raise ValueError(
            f"data.source={spec!r}: {path!r} has no train shards "
            f"(train/shard-*-of-*.array_record); prepare the dataset again."
        )
    return manifest


def check_tokenizer(spec: str, path: str, manifest: dict, tokenizer_spec: str, tokenizer) -> None:
    """Raises a ValueError if `tokenizer` is not the one the prepared dataset was made with."""
    described = manifest.get("tokenizer")
    if not isinstance(described, dict):
        raise ValueError(f"data.source={spec!r}: {path}/{MANIFEST} describes no tokenizer.")
    fields = ("vocab_size", "bos_id", "eos_id", "pad_id")
    theirs = {k: described[k] for k in fields if k in described}
    ours = {k: getattr(tokenizer, k) for k in theirs}
    if theirs != ours:
        used = described.get("path") or described.get("type") or "?"
        raise ValueError(
            f"data.tokenizer={tokenizer_spec!r} ({ours}) does not match the tokenizer "
            f"{path!r} was prepared with ({used!r}: {theirs}); set data.tokenizer to "
            f"{used!r} or prepare the dataset with {tokenizer_spec!r}."
        )


@functools.cache
def _prepared_documents(path: str, split: str) -> ArrayRecordDocuments:
    return ArrayRecordDocuments(prepared_shards(path, split))
