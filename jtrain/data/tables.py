"""`csv:PATH` and `parquet:PATH` sources: tables of feature columns and one target column.

PATH is a file or a glob; every file is read (`table_files`: CSV with pyarrow's reader, Parquet
with `readers.iter_file_rows`) and the rows of all of them pooled. A `split` column (train, val or
test) places each row; without one, a row goes to the split of a hash of its values (by column
name, numbers compared as numbers, so a CSV and a Parquet file of the same table split alike).

A column's kind is read off the train split: numeric when most of its values read as numbers
(so a stray "abc" is a bad row, not a reason to read the column as text), else categorical;
booleans are categorical. Missing values (empty, null, NaN, "NA") are allowed in features. A
row is bad, skipped and counted with its "file:row", when its target is missing or (numeric
target) not a number, when a numeric column holds something else ("abc", inf), when its
`split` is not a split, or when a CSV line has the wrong number of cells or invalid UTF-8
(`table_files` says how CSV rows are numbered). Rows whose split cannot be told are counted
with train.

`read_features` reads one file's rows for `jtrain.predict` with the same parsing, the kind of
each column given by the run's preprocessing rather than read off a train split.
"""

from __future__ import annotations

import dataclasses
import decimal
import glob
import math
import os
from collections.abc import Sequence

import numpy as np

from jtrain.data import table_files
from jtrain.data.records import SPLITS, Skipped
from jtrain.data.supervised import RawSplit, SourceError, bad_rows, hashed_split

SPLIT_COLUMN = "split"
# A table file's kind by its name (a csv file may be compressed; readers.open_binary).
TABLE_SUFFIXES = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".csv.zst": "csv",
    ".csv.zstd": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_MISSING = frozenset({"", "nan", "na", "n/a", "null"})  # text read as a missing value
_NOT_A_NUMBER = ("not_a_number", "numeric column {name!r} is {value!r}")


@dataclasses.dataclass
class _Cells:
    """One column's cells, each parsed once."""

    raw: list
    missing: np.ndarray  # bool: empty, null, NaN or "NA"
    numbers: np.ndarray  # float64: the cell as a number; NaN if missing or not a number

    @classmethod
    def parse(cls, raw: list) -> _Cells:
        missing = np.fromiter((_missing(v) for v in raw), bool, len(raw))
        numbers = np.fromiter((_number(v) for v in raw), np.float64, len(raw))
        numbers[missing] = np.nan
        return cls(raw, missing, numbers)

    def not_numbers(self) -> np.ndarray:
        """Cells present but not numbers."""
        return ~self.missing & np.isnan(self.numbers)

    def canonical(self) -> list:
        """Each cell for the content hash: None, a float, or text."""
        missing, numbers = self.missing.tolist(), self.numbers.tolist()  # Python scalars: fast
        return [
            None if gone else (text_of(v) if math.isnan(x) else x)
            for v, gone, x in zip(self.raw, missing, numbers, strict=True)
        ]


def allowed(kind: str) -> tuple[str, ...]:
    """How an error lists this kind."""
    return (f"{kind}:PATH",)


def _paths(kind: str, location: str) -> list[str]:
    pattern = os.path.expanduser(location)
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise SourceError(f"{kind}:{location} matches no files; check the path or glob")
    return paths


def check(kind: str, location: str, *, target: str, features: tuple[str, ...]) -> None:
    """Checks that PATH matches files and the first one has the target and feature columns."""
    paths = _paths(kind, location)
    if not target:
        raise ValueError(
            f"data.target is empty; set it to the label or value column of "
            f"data.source='{kind}:{location}'."
        )
    _feature_columns(paths[0], table_files.header(kind, paths[0]), target, features)


def _feature_columns(
    path: str, columns: list[str], target: str, features: tuple[str, ...]
) -> tuple[str, ...]:
    """`features`, or every column but the target and `split`; a ValueError names the key."""
    if target not in columns:
        raise ValueError(
            f"data.target={target!r} is not a column of {path}; its columns: {columns}."
        )
    for name in features:
        if name not in columns or name in (target, SPLIT_COLUMN):
            why = "is not a column" if name not in columns else "is the target or split column"
            raise ValueError(f"data.features: {name!r} {why} of {path}; its columns: {columns}.")
    chosen = tuple(features) or tuple(c for c in columns if c not in (target, SPLIT_COLUMN))
    if not chosen:
        raise ValueError(f"{path} has no feature columns besides data.target={target!r}.")
    return chosen


def load(
    kind: str, location: str, *, target: str, features: tuple[str, ...], image_size: int
) -> dict[str, RawSplit]:
    """Reads every file PATH matches into a RawSplit per split (data.image_size is unused)."""
    check(kind, location, target=target, features=features)
    skipped = {split: Skipped() for split in SPLITS}
    paths = _paths(kind, location)
    table = table_files.read(kind, paths, skipped["train"])
    features = _feature_columns(paths[0], list(table.columns), target, features)
    cells = {name: _Cells.parse(column) for name, column in table.columns.items()}
    splits = _assign_splits(table, cells, skipped["train"])
    train = splits == "train"
    numeric = {name: _is_numeric(cells[name], train) for name in (target, *features)}
    reasons = _bad_rows(cells, target, features, numeric)
    out = {}
    for split in SPLITS:
        good = []
        for i in np.flatnonzero(splits == split):
            if i in reasons:
                skipped[split].add(table.where[i], *reasons[i])
            else:
                good.append(i)
        rows = np.asarray(good, dtype=np.int64)
        columns = {name: _array(cells[name], rows, numeric[name]) for name in features}
        labels = _array(cells[target], rows, numeric[target])
        out[split] = RawSplit(columns, labels, None, bad_rows(skipped[split]))
    _check_rows(f"{kind}:{location}", out, skipped)
    return out


def _check_rows(source: str, splits: dict[str, RawSplit], skipped: dict[str, Skipped]) -> None:
    if len(splits["train"]):
        return
    bad = [example for s in skipped.values() for example in s.examples][:3]
    problem = "every row is bad" if not any(map(len, splits.values())) else "no train rows"
    raise ValueError(
        f"data.source={source!r}: {problem} (e.g. {'; '.join(bad) or 'no rows at all'}); "
        "check data.target and the file's contents."
    )


def table_kind(path: str) -> str | None:
    """The kind of a table file by its name ("csv" or "parquet", `TABLE_SUFFIXES`), or None."""
    name = path.lower()
    return next((kind for suffix, kind in TABLE_SUFFIXES.items() if name.endswith(suffix)), None)


def read_features(
    path: str, *, numeric: Sequence[str], categorical: Sequence[str]
) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """The rows of one csv or parquet file to predict: (columns as RawSplit.features holds
    them, each row's number as bad rows are reported, the bad rows as RawSplit.bad).

    A column's kind is given (the one its preprocessing was fitted on), not guessed; other
    columns, a target or a `split` column among them, are not read. A row is bad when a
    numeric column holds something else, or for the reasons of a CSV line at training.
    """
    kind = table_kind(path)
    if kind is None:
        suffixes = ", ".join(TABLE_SUFFIXES)
        raise ValueError(f"{path}: not a table file; its name should end in {suffixes}.")
    header = table_files.header(kind, path)
    missing = [name for name in (*numeric, *categorical) if name not in header]
    if missing:
        raise ValueError(
            f"{path} has no column {missing[0]!r}, which the model reads (missing: {missing}); "
            f"its columns: {header}."
        )
    skipped = Skipped()
    table = table_files.read(kind, [path], skipped)
    cells = {name: _Cells.parse(table.columns[name]) for name in (*numeric, *categorical)}
    reasons: dict[int, tuple[str, str]] = {}
    _not_numbers(cells, [(name, *_NOT_A_NUMBER) for name in numeric], reasons)
    for i in sorted(reasons):
        skipped.add(table.where[i], *reasons[i])
    kept = np.array([i for i in range(len(table.where)) if i not in reasons], dtype=np.int64)
    columns = {name: _array(cells[name], kept, True) for name in numeric}
    columns.update({name: _array(cells[name], kept, False) for name in categorical})
    numbers = np.array([int(table.where[i].rpartition(":")[2]) for i in kept], dtype=np.int64)
    return columns, numbers, bad_rows(skipped)


# Splits, column kinds and bad rows.


def _assign_splits(
    table: table_files.Table, cells: dict[str, _Cells], skipped: Skipped
) -> np.ndarray:
    """Each row's split: its `split` cell, or a hash of its values; "" for a bad split."""
    if SPLIT_COLUMN in table.columns:
        out = []
        for where, value in zip(table.where, table.columns[SPLIT_COLUMN], strict=True):
            split = value.strip().lower() if isinstance(value, str) else None
            if split not in SPLITS:
                skipped.add(where, "bad_split", f"split is {value!r}, not train, val or test")
            out.append(split if split in SPLITS else "")
        return np.array(out, dtype=object)
    names = sorted(cells)  # by name, so the order of the columns does not matter
    canonical = [cells[name].canonical() for name in names]
    keys = (repr(tuple(zip(names, values, strict=True))) for values in zip(*canonical, strict=True))
    return np.array([hashed_split(key) for key in keys], dtype=object)


def _is_numeric(cells: _Cells, train: np.ndarray) -> bool:
    present = ~cells.missing & train
    numbers = present & ~np.isnan(cells.numbers)
    return not present.any() or 2 * int(numbers.sum()) > int(present.sum())


def _bad_rows(
    cells: dict[str, _Cells], target: str, features: tuple[str, ...], numeric: dict[str, bool]
) -> dict[int, tuple[str, str]]:
    """{row: (kind, why)} of the rows that cannot be used; the first problem of each."""
    reasons = {
        int(i): ("missing_target", f"the target {target!r} is missing")
        for i in np.flatnonzero(cells[target].missing)
    }
    checks = [(target, "bad_target", "the target {name!r} is {value!r}, not a number")]
    checks += [(name, *_NOT_A_NUMBER) for name in features]
    _not_numbers(cells, [check for check in checks if numeric[check[0]]], reasons)
    return reasons


def _not_numbers(
    cells: dict[str, _Cells], checks: list[tuple[str, str, str]], reasons: dict
) -> None:
    """Adds to `reasons` the rows where a numeric column of `checks` (name, kind, why) holds
    something else, unless the row already has a reason."""
    for name, kind, why in checks:
        for i in np.flatnonzero(cells[name].not_numbers()):
            value = cells[name].raw[i]
            reasons.setdefault(int(i), (kind, why.format(name=name, value=value)))


def _array(cells: _Cells, rows: np.ndarray, numeric: bool) -> np.ndarray:
    """The column's cells of `rows`: float64 (NaN missing), or text (None missing)."""
    if numeric:
        return cells.numbers[rows]
    out = np.empty(len(rows), dtype=object)
    out[:] = [None if cells.missing[i] else text_of(cells.raw[i]) for i in rows.tolist()]
    return out


def _missing(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _MISSING
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value) -> float:
    """`value` as a finite float, or NaN if it is not a number (booleans are not)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return math.nan
    elif isinstance(value, (bool, np.bool_)):
        return math.nan
    elif isinstance(value, (int, float, decimal.Decimal, np.number)):
        number = float(value)
    else:
        return math.nan
    return number if math.isfinite(number) else math.nan


def text_of(value) -> str:
    """A categorical cell as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
