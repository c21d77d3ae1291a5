"""Sources: where the documents of each split come from, as text and as token ids.

A named source is a function returning `{split: [document text, ...]}` for every split in
`SPLITS`, registered by name in `_SOURCES` (the CPython docs and the standard library's
source code, both embedded in every install). Splits are assigned with `split_of`, a hash of
a document key alone, so they never depend on Python's hash seed or the input order.
`data.source` names one source or a weighted mixture (`parse_spec`): a registered name,
`prepared:DIR` (ArrayRecord shards of int32 token ids written by `jtrain.data.prepare`) or
`files:GLOB` (.jsonl/.txt, optionally gzipped, split by the sha256 of each text and
tokenized when first used). `load_documents` gives one split of one source as `Documents`:
token-id documents by index, with their lengths.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jtrain.data.documents import (
    ArrayRecordDocuments,
    Documents,
    InMemoryDocuments,
)

SPLITS = ("train", "val", "test")


def split_of(key: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """Returns the split of `key`: sha256(key) as a uniform number in [0, 1), bucketed."""
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or not math.isclose(sum(fractions), 1):
        raise ValueError(
            f"fractions must be {len(SPLITS)} non-negative numbers for {SPLITS} summing to 1, "
            f"got {tuple(fractions)}."
        )
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for split, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if u < cumulative:
            return split
    # Rounding can leave the sum a hair under 1: fall back to the last non-empty split.
    return next(s for s, f in zip(reversed(SPLITS), reversed(fractions), strict=True) if f > 0)


# Several pydoc topics repeat long passages of others ("compound" holds the text of "if",
# "while", "try", "with", ...; "specialnames" that of "customization", ...). Split by topic
# alone, 36% of the test split's text was verbatim in train. So topics that share a paragraph
# of at least _SHARED_PARAGRAPH_CHARS characters form a group, and a group goes to the split of
# its first topic name. The groups are lumpy (the two largest hold 80 KB and 104 KB), and the
# plain hash left test 4% of the bytes; the salt was picked from jtrain-pydoc-v1..v39 as the
# one closest to 80/10/10 bytes: on CPython 3.11 train/val/test get 64/7/8 topics and
# 375,795/52,227/38,095 UTF-8 bytes (80.6%/11.2%/8.2%), and 1 of val's 518 100-character
# chunks (none of test's) occurs in train.
_PYDOC_SALT = "jtrain-pydoc-v9"
_SHARED_PARAGRAPH_CHARS = 200


def _topic_groups(topics: dict[str, str]) -> dict[str, str]:
    """Maps each topic name to the first name of the topics it shares paragraphs with."""
    parent = {name: name for name in topics}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    first_seen: dict[str, str] = {}
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip()
            if len(paragraph) < _SHARED_PARAGRAPH_CHARS:
                continue
            a, b = root(first_seen.setdefault(paragraph, name)), root(name)
            parent[max(a, b)] = min(a, b)
    return {name: root(name) for name in topics}


@functools.cache
def _pydoc_topics() -> dict[str, tuple[str, ...]]:
    from pydoc_data.topics import topics

    groups = _topic_groups(topics)
    docs: dict[str, list[str]] = {split: [] for split in SPLITS}
    for name in sorted(topics):
        docs[split_of(f"{_PYDOC_SALT}:{groups[name]}")].append(topics[name])
    return {split: tuple(texts) for split, texts in docs.items()}


def pydoc_topics() -> dict[str, list[str]]:
    """Returns CPython's `pydoc_data.topics` help texts per split, ordered by topic name."""
    return {split: list(texts) for split, texts in _pydoc_topics().items()}


@functools.cache
def _python_stdlib() -> dict[str, tuple[str, ...]]:
    import sysconfig

    # Top-level modules only (168 files, 4.7 MB on CPython 3.11): packages add tests and
    # generated tables, and the top level is already a different domain from the docs.
    directory = sysconfig.get_paths()["stdlib"]
    docs: dict[str, list[str]] = {split: [] for split in SPLITS}
    for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        docs[split_of(f"jtrain-stdlib-v1:{os.path.basename(path)}")].append(text)
    return {split: tuple(texts) for split, texts in docs.items()}


def python_stdlib() -> dict[str, list[str]]:
    """Returns the source code of the standard library's top-level modules per split."""
    return {split: list(texts) for split, texts in _python_stdlib().items()}


_SOURCES: dict[str, Callable[[], dict[str, list[str]]]] = {
    "pydoc_topics": pydoc_topics,
    "python_stdlib": python_stdlib,
}


def source_names() -> tuple[str, ...]:
    """Returns the names `load_source` accepts."""
    return tuple(sorted(_SOURCES))


def load_source(name: str) -> dict[str, list[str]]:
    """Returns the documents of source `name` per split."""
    if name not in _SOURCES:
        raise ValueError(f"Unknown data source {name!r}; allowed: {', '.join(source_names())}.")
    return _SOURCES[name]()


# Source specs: what config.data.source names.

PREPARED, FILES = "prepared:", "files:"
_TEXT_SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".txt.gz")
_ALLOWED = (
    "{names}, prepared:DIR (a directory written by `python -m jtrain.data.prepare`), "
    "files:GLOB (.jsonl or .txt files, optionally .gz, tokenized on the fly), or a weighted "
    "mixture such as 'prepared:/data/web=0.7,pydoc_topics=0.3'"
)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One source of `data.source`: a registered name, a prepared directory or a file glob."""

    kind: str  # "named" | "prepared" | "files"
    target: str  # the name, the directory or the glob
    weight: float = 1.0  # mixture weight (relative)

    def __str__(self) -> str:
        prefix = {"named": "", "prepared": PREPARED, "files": FILES}[self.kind]
        return f"{prefix}{self.target}"


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
            weight = 1.0  # an "=" inside a path, not a weight
        else:
            body = head.strip()
            if not (math.isfinite(weight) and weight > 0):
                raise _bad_spec(spec, f"the weight of {body!r} must be a positive number", names)
    for kind, prefix in (("prepared", PREPARED), ("files", FILES)):
        if body.startswith(prefix):
            target = body[len(prefix) :].strip()
            if not target:
                raise _bad_spec(spec, f"{body!r} names no path", names)
            return SourceSpec(kind, target, weight)
    if body not in (_SOURCES if names is None else names):
        raise _bad_spec(spec, f"{body!r} is not a known source", names)
    return SourceSpec("named", body, weight)


def parse_spec(spec, names: Sequence[str] | None = None) -> tuple[SourceSpec, ...]:
    """Parses `data.source`: comma-separated sources, each with an optional `=weight`.

    `names` replaces the registered text sources as the names allowed (SFT example sets).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise _bad_spec(spec, "it must be a non-empty string", names)
    items = [item.strip() for item in spec.split(",")]
    if not all(items):
        raise _bad_spec(spec, "it has an empty item between commas", names)
    return tuple(_parse_item(spec, item, names) for item in items)


def _encode_all(texts: Sequence[str], tokenizer) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(list(texts))]


@functools.cache
def _named_documents(name: str, tokenizer: str, split: str) -> InMemoryDocuments:
    from jtrain.data import tokenizers

    return InMemoryDocuments(
        _encode_all(load_source(name)[split], tokenizers.get_tokenizer(tokenizer))
    )


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


# Raw files tokenized on the fly: .jsonl (one document per line) and .txt (one per file).

_log = logging.getLogger(__name__)


def text_files(
    spec: str,
    pattern: str,
    suffixes: tuple[str, ...] = _TEXT_SUFFIXES,
    hint: str = "narrow the glob, or prepare other formats with `python -m jtrain.data.prepare`",
) -> list[str]:
    """The files `pattern` matches, sorted; raises a ValueError for none or another suffix."""
    paths = sorted(
        p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    if not paths:
        raise ValueError(
            f"data.source={spec!r}: {FILES}{pattern} matches no files; check the glob."
        )
    unknown = [p for p in paths if not p.endswith(suffixes)]
    if unknown:
        raise ValueError(
            f"data.source={spec!r}: {unknown[0]!r} is not one of {', '.join(suffixes)}; {hint}."
        )
    return paths


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_texts(path: str, text_field: str, skipped: list[str]) -> Iterator[str]:
    with _open_text(path) as f:
        if not path.endswith((".jsonl", ".jsonl.gz")):
            yield f.read()
            return
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, TypeError, KeyError, IndexError) as err:
                skipped.append(f"{path}:{line_number}: {type(err).__name__} {err}")
                continue
            if isinstance(text, str):
                yield text
            else:
                skipped.append(f"{path}:{line_number}: {text_field!r} is not a string")


@functools.cache
def _file_texts(pattern: str, text_field: str) -> dict[str, tuple[str, ...]]:
    texts: dict[str, list[str]] = {split: [] for split in SPLITS}
    skipped: list[str] = []
    for path in text_files(f"{FILES}{pattern}", pattern):
        for text in _read_texts(path, text_field, skipped):
            texts[split_of(hashlib.sha256(text.encode("utf-8")).hexdigest())].append(text)
    if skipped:
        _log.warning(
            "%s%s: skipped %d records without a %r string, e.g. %s",
            FILES,
            pattern,
            len(skipped),
            text_field,
            "; ".join(skipped[:3]),
        )
    return {split: tuple(t) for split, t in texts.items()}


@functools.cache
def _file_documents(pattern: str, text_field: str, tokenizer: str, split: str) -> InMemoryDocuments:
    from jtrain.data import tokenizers

    texts = _file_texts(pattern, text_field)[split]
    return InMemoryDocuments(_encode_all(texts, tokenizers.get_tokenizer(tokenizer)))


def load_documents(source: SourceSpec, split: str, tokenizer: str, text_field: str) -> Documents:
    """Returns the token documents of `split` of one source (cached per process)."""
    if source.kind == "prepared":
        return _prepared_documents(os.path.abspath(source.target), split)
    if source.kind == "files":
        return _file_documents(source.target, text_field, tokenizer, split)
    return _named_documents(source.target, tokenizer, split)
