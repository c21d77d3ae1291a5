"""Record sets: the records of one split by index, where each came from, and what was skipped.

A record is a dict (`{"text": ...}` for language modelling, `{"prompt": ..., "response": ...}`
or `{"messages": [...]}` for chat examples). `Records` holds one split of one source for
random access, with `where(i)` naming record i's origin ("path:line" for files,
"name:split[index]" otherwise) and `skipped`, the bad records of the whole source by kind.
`from_files` reads files with the one reader (`readers.iter_file_rows`), `from_function` takes
a function's records; both ask the task's `split_key` of every record, which picks a hashed
split and rejects (ValueError) records the task cannot use. Embedded record sets register
here by name (`register`), each a function from a split to that split's records. Splits are
assigned with `split_of`, a hash of a key alone, so they never depend on Python's hash seed
or the input order.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jtrain.data import readers

SPLITS = ("train", "val", "test")
# What an embedded set's records are: {"text"}, chat examples, preference pairs (prompt,
# chosen, rejected), or prompts for RL (a prompt and fields for the rewards).
HOLDS = ("text", "chat", "preference", "prompts")
_QUOTED = 3  # bad records quoted in a warning

RecordSet = Callable[[str], Sequence[dict]]
SplitKey = Callable[[dict], str]  # a task's key of a record; a ValueError: a bad record


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


class BadRecord(ValueError):
    """A record a task cannot use; `kind` is what the warning counts it as."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


@dataclasses.dataclass
class Skipped:
    """Bad records of one source: a count per kind and the first few quoted as "where: why"."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, where: str, kind: str, reason: str) -> None:
        """Counts one bad record of `kind` at `where` ("path:line")."""
        self.counts[kind] += 1
        if len(self.examples) < _QUOTED:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        """Bad records of every kind."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line for a warning: "skipped N records (kind: n, ...), e.g. where: why; ..."."""
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
        return f"skipped {self.total} records ({kinds}), e.g. {'; '.join(self.examples)}"


class Records(Sequence):
    """One split of one source: records by index (dicts; do not mutate: they are cached)."""

    def __init__(
        self,
        name: str,
        items: Sequence[dict],
        labels: Sequence[str],
        label_ids: Sequence[int],
        positions: Sequence[int],
        skipped: Skipped,
        indexed: bool = False,
    ):
        self.name, self.skipped, self._indexed = name, skipped, indexed
        self._items = tuple(items)
        self._labels = tuple(labels)  # file paths, or one set name
        self._label_ids = np.asarray(label_ids, dtype=np.int32)
        self._positions = np.asarray(positions, dtype=np.int64)  # line, or index in the set

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        return self._items[index]

    def where(self, index: int) -> str:
        """Where record `index` came from: "path:line", or "name:split[i]" for a set."""
        label, position = self._labels[self._label_ids[index]], int(self._positions[index])
        return f"{label}[{position}]" if self._indexed else f"{label}:{position}"

    def __repr__(self) -> str:
        return f"Records({self.name!r}, {len(self)} records, {self.skipped.total} skipped)"


@dataclasses.dataclass
class RecordsBuilder:
    """Collects one split's records with their origins; `build` freezes them."""

    name: str
    items: list[dict] = dataclasses.field(default_factory=list)
    label_ids: list[int] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)

    def add(self, record: dict, label_id: int, position: int) -> None:
        """Adds `record`, found at `position` (line or index) of label `label_id`."""
        self.items.append(record)
        self.label_ids.append(label_id)
        self.positions.append(position)

    def build(self, labels: Sequence[str], skipped: Skipped, indexed: bool = False) -> Records:
        """The records added so far, as a `Records`."""
        return Records(
            self.name, self.items, labels, self.label_ids, self.positions, skipped, indexed
        )


# Loading: files through the one reader, or a function's records, one Records per split.


def _keyed(split_key: SplitKey, record: dict, where: str, skipped: Skipped) -> str | None:
    """The record's key, or None (counted in `skipped`) if it is not UTF-8 or `split_key` says
    it is bad."""
    try:
        _check_utf8(record)
        return split_key(record)
    except ValueError as err:
        skipped.add(where, getattr(err, "kind", "bad_record"), str(err))
        return None


def _check_utf8(value) -> None:
    """Raises BadRecord for a string that no UTF-8 can hold: a lone surrogate, which valid JSON
    (an escape such as \\udc80) or a function's text can carry, and a tokenizer fails on."""
    if isinstance(value, str):
        if value.isascii():  # O(1): the common case copies nothing
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            code = ord(value[err.start])
            reason = f"invalid UTF-8: a lone surrogate \\u{code:04x} at character {err.start + 1}"
            raise BadRecord("invalid_utf8", reason) from None
    elif isinstance(value, dict):
        for item in value.values():
            _check_utf8(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_utf8(item)


def _file_rows(path: str, text_key: str, skipped: Skipped):
    """The good rows of file `path`; bad ones, and a file that breaks off, go to `skipped`."""
    line = 0
    try:
        # universal_newlines: text files read as Python's text mode did before the one reader.
        for row in readers.iter_file_rows(path, text_key=text_key, universal_newlines=True):
            line = row.line
            if row.error is None:
                yield row
            else:
                skipped.add(row.source, row.error, row.reason)
    except ValueError as err:  # corrupt, truncated or unreadable: what came before stays
        skipped.add(f"{path}:{line + 1}", "unreadable", str(err))


def from_files(
    name: str,
    files: Mapping[str | None, Sequence[str]],
    split_key: SplitKey,
    text_key: str,
    skipped: Skipped,
) -> dict[str, Records]:
    """Reads `files` {split: paths} into Records per split; split None: by split_key's hash."""
    builders = {split: RecordsBuilder(name) for split in SPLITS}
    labels: list[str] = []
    for given, paths in files.items():
        for path in paths:
            labels.append(path)
            for row in _file_rows(path, text_key, skipped):
                key = _keyed(split_key, row.value, row.source, skipped)
                if key is not None:
                    split = split_of(key) if given is None else given
                    builders[split].add(row.value, len(labels) - 1, row.line)
    return {split: builders[split].build(labels, skipped) for split in SPLITS}


def from_function(
    name: str, function: RecordSet, split_key: SplitKey, skipped: Skipped
) -> dict[str, Records]:
    """Records per split from `function(split)`, checked to be a sequence of dicts."""
    out = {}
    for split in SPLITS:
        items, builder = _checked_items(name, split, function(split)), RecordsBuilder(name)
        for i, record in enumerate(items):
            if _keyed(split_key, record, f"{name}:{split}[{i}]", skipped) is not None:
                builder.add(record, 0, i)
        out[split] = builder.build([f"{name}:{split}"], skipped, indexed=True)
    return out


def _checked_items(name: str, split: str, result) -> list[dict]:
    """`result` as a list of dicts; a ValueError names the source, the split and the problem."""
    what = f"data.source={name!r}: for split {split!r}, the function returned"
    sized = hasattr(result, "__len__") and hasattr(result, "__getitem__")
    if isinstance(result, (str, bytes, Mapping)) or not sized:
        raise ValueError(
            f"{what} a {type(result).__name__}, not a sequence of dicts; return a list of "
            "records such as [{'text': ...}] (a list, not a generator)."
        )
    items = [result[i] for i in range(len(result))]
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(
                f"{what} a sequence whose item {i} is a {type(item).__name__}, not a dict; "
                "each record must be a dict such as {'text': ...}."
            )
    return items


# The registry of embedded record sets.

_REGISTRY: dict[str, tuple[RecordSet, str]] = {}


def register(name: str, *, holds: str = "text") -> Callable[[RecordSet], RecordSet]:
    """Registers a function(split) -> records as the embedded record set `name`."""
    if holds not in HOLDS:
        raise ValueError(f"holds must be one of {HOLDS}, got {holds!r}.")

    def decorator(function: RecordSet) -> RecordSet:
        if name in _REGISTRY and _REGISTRY[name][0] is not function:
            raise ValueError(f"A record set named {name!r} is already registered.")
        _REGISTRY[name] = (function, holds)
        return function

    return decorator


def registered_names(holds: str = "text") -> tuple[str, ...]:
    """The names of the registered record sets whose records are `holds`, sorted."""
    return tuple(sorted(name for name, (_, h) in _REGISTRY.items() if h == holds))


def registered(name: str) -> RecordSet:
    """The record set function registered as `name`; a ValueError lists those there are."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown record set {name!r}; allowed: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name][0]
