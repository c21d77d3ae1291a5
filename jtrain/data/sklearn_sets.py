"""`sklearn:NAME` sources: the small datasets bundled with scikit-learn (nothing downloaded).

`digits` is a set of 8x8 grayscale images ({"image": float32 [N, 8, 8, 1]}, pixels / 16);
`breast_cancer`, `iris` and `wine` are numeric tables with class labels (ints naming
`target_names`); `diabetes` is a numeric table with a float target, unscaled, so that the
`Preprocessor`'s standardisation is the only one applied. A row goes to the split of a hash of
its index with a fixed salt: the bundled sets never change order, so the splits are fixed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jtrain.data.records import SPLITS, Skipped
from jtrain.data.supervised import RawSplit, SourceError, bad_rows, hashed_split

_SALT = "jtrain.sklearn"  # changing it reshuffles every sklearn set's splits

Loaded = tuple[dict[str, np.ndarray], np.ndarray, tuple[str, ...] | None]


def _datasets():
    from sklearn import datasets  # imported on use: it takes a second

    return datasets


def _digits() -> Loaded:
    bunch = _datasets().load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]
    return {"image": images}, bunch.target.astype(np.int64), _names(bunch.target_names)


def _columns(bunch) -> dict[str, np.ndarray]:
    data = np.asarray(bunch.data, dtype=np.float64)
    return {str(name): data[:, i].copy() for i, name in enumerate(bunch.feature_names)}


def _classes(loader: str) -> Callable[[], Loaded]:
    def load() -> Loaded:
        bunch = getattr(_datasets(), loader)()
        target = bunch.target.astype(np.int64)
        return _columns(bunch), target, _names(bunch.target_names)

    return load


def _diabetes() -> Loaded:
    bunch = _datasets().load_diabetes(scaled=False)
    return _columns(bunch), bunch.target.astype(np.float64), None


def _names(target_names) -> tuple[str, ...]:
    return tuple(str(name) for name in target_names)


_SETS: dict[str, Callable[[], Loaded]] = {
    "digits": _digits,
    "breast_cancer": _classes("load_breast_cancer"),
    "iris": _classes("load_iris"),
    "wine": _classes("load_wine"),
    "diabetes": _diabetes,
}


def allowed(kind: str) -> tuple[str, ...]:
    """How an error lists the sets: sklearn:digits, ..."""
    return tuple(f"{kind}:{name}" for name in _SETS)


def check(kind: str, location: str, *, target: str, features: tuple[str, ...]) -> None:
    """Raises a SourceError unless `location` names a bundled set."""
    if location not in _SETS:
        raise SourceError(f"{location!r} is not a scikit-learn set jtrain knows")


def load(
    kind: str, location: str, *, target: str, features: tuple[str, ...], image_size: int
) -> dict[str, RawSplit]:
    """The set's splits (data.target, data.features and data.image_size do not apply)."""
    check(kind, location, target=target, features=features)
    columns, labels, class_names = _SETS[location]()
    splits = np.array([hashed_split(f"{_SALT}:{location}:{i}") for i in range(len(labels))])
    out = {}
    for split in SPLITS:
        rows = splits == split
        split_columns = {name: column[rows] for name, column in columns.items()}
        out[split] = RawSplit(split_columns, labels[rows], class_names, bad_rows(Skipped()))
    return out
