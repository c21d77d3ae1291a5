"""Supervised data: the tables and image sets a classifier or regressor learns from.

`data.source` names one of (`_KINDS`, a registry of prefix -> the module that reads it):

- `sklearn:NAME`: a set bundled with scikit-learn (`sklearn_sets.py`; no download);
- `csv:PATH`, `parquet:PATH`: a table, PATH a file or a glob (`tables.py`), with
  `data.target` the label or value column and `data.features` the feature columns;
- `images:DIR`: one folder of PNG/JPEG images per class (`image_folder.py`).

`load_split` gives one split of a source as a `RawSplit`: the feature columns or images and
the targets, before any statistics are fitted (`features.Preprocessor` does that on train).
The whole source is read and split once per process and cached. A source with a `split`
column or `train/val/test` folders keeps its own splits; otherwise each row goes to the split
of a sha256 hash of its content (`hashed_split`, fractions `FRACTIONS`), so the same row lands
in the same split whatever the order of the input. Bad rows are skipped, counted by kind with
the first few quoted as "file:row: why" (`records.Skipped`), and logged once per source.

A module a kind names defines `allowed(kind)` (how errors list it), `check(kind, location, *,
target, features)` (cheap: raises `SourceError` for a location that names nothing readable,
ValueError for other keys) and `load(kind, location, *, target, features, image_size)`
returning a `RawSplit` per split.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging

import numpy as np

from jtrain.data.records import SPLITS, Skipped, split_of
from jtrain.errors import DataError

_log = logging.getLogger(__name__)

FRACTIONS = (0.7, 0.15, 0.15)  # train, val, test shares of a hashed split

# The registry: a data.source prefix -> the module that checks and loads it.
_KINDS = {
    "sklearn": "jtrain.data.sklearn_sets",
    "csv": "jtrain.data.tables",
    "parquet": "jtrain.data.tables",
    "images": "jtrain.data.image_folder",
}


class SourceError(DataError):
    """A data.source location that names nothing readable; the message says what is wrong."""


@dataclasses.dataclass
class RawSplit:
    """One split of a supervised source, as read: cached, so do not mutate the arrays."""

    # Table columns: float64 with NaN for missing (numeric), object arrays of str | None
    # (categorical); or {"image": float32 [N, H, W, C]} with values in [0, 1].
    features: dict[str, np.ndarray]
    target: np.ndarray  # one per row: class labels (str or int) or float64 values
    class_names: tuple[str, ...] | None  # the dataset's own names of int labels (sklearn)
    bad: dict  # {"count": int, "kinds": {kind: int}, "examples": ["file:row: why", ...]}

    def __len__(self) -> int:
        return len(self.target)


def hashed_split(key: str) -> str:
    """The split of a row whose content is `key`: train, val or test by `FRACTIONS`."""
    return split_of(key, FRACTIONS)


def bad_rows(skipped: Skipped) -> dict:
    """`skipped` as RawSplit.bad: the count, the count per kind and the first few quoted."""
    kinds = {kind: n for kind, n in sorted(skipped.counts.items())}
    return {"count": skipped.total, "kinds": kinds, "examples": list(skipped.examples)}


def is_supervised(source) -> bool:
    """Whether `source` names a supervised source (its prefix is a registered kind)."""
    if not isinstance(source, str):
        return False
    prefix, sep, _ = source.strip().partition(":")
    return bool(sep) and prefix in _KINDS


def _allowed() -> str:
    kinds = dict.fromkeys(
        pattern for kind, module in _KINDS.items() for pattern in _module(module).allowed(kind)
    )
    return ", ".join(kinds)


def _module(name: str):
    return importlib.import_module(name)


def _invalid(source, problem: str) -> ValueError:
    return ValueError(f"data.source={source!r} is invalid: {problem}; allowed: {_allowed()}.")


def _parse(source) -> tuple[str, str]:
    """(kind, location) of `source`; a ValueError lists the kinds allowed."""
    if not isinstance(source, str) or not source.strip():
        raise _invalid(source, "it must be a non-empty string")
    kind, sep, location = source.strip().partition(":")
    if not sep or kind not in _KINDS:
        raise _invalid(source, f"{kind!r} is not a supervised source kind")
    if not location.strip():
        raise _invalid(source, f"{kind}: names no {'set' if kind == 'sklearn' else 'path'}")
    return kind, location.strip()


def check_source(source: str, *, target: str, features: tuple[str, ...]) -> None:
    """Checks cheaply (headers and listings, not every row) that `source` can load."""
    kind, location = _parse(source)
    try:
        _module(_KINDS[kind]).check(kind, location, target=target, features=tuple(features))
    except SourceError as err:
        raise _invalid(source, str(err)) from None


def load_split(
    source: str,
    split: str,
    *,
    target: str = "",
    features: tuple[str, ...] = (),
    image_size: int = 32,
) -> RawSplit:
    """Returns `split` of `source` (the whole source is read and split once per process)."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; allowed: {', '.join(SPLITS)}.")
    return _load_all(source, target, tuple(features), int(image_size))[split]


@functools.cache
def _load_all(
    source: str, target: str, features: tuple[str, ...], image_size: int
) -> dict[str, RawSplit]:
    check_source(source, target=target, features=features)
    kind, location = _parse(source)
    try:
        splits = _module(_KINDS[kind]).load(
            kind, location, target=target, features=features, image_size=image_size
        )
    except SourceError as err:
        raise _invalid(source, str(err)) from None
    for name, raw in splits.items():
        _freeze(raw)
        if raw.bad["count"]:
            kinds = ", ".join(f"{k}: {n}" for k, n in raw.bad["kinds"].items())
            _log.warning(
                "data.source %s, split %s: skipped %d bad rows (%s), e.g. %s",
                source,
                name,
                raw.bad["count"],
                kinds,
                "; ".join(raw.bad["examples"]),
            )
    return splits


def _freeze(raw: RawSplit) -> None:
    """Makes the cached arrays read-only, so a caller that writes to one fails loudly."""
    for array in (*raw.features.values(), raw.target):
        array.setflags(write=False)
