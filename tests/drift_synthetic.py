"""Synthetic tables for the drift tests and benchmark: independent columns of several kinds
(normal, skewed, integer counts, with missing values, categorical), optionally shifted."""

import numpy as np

from jtrain.drift.profile import Column, Sample

NUMERIC = ("normal", "lognormal", "counts", "with_missing", "uniform", "bimodal")
CATEGORICAL = ("colour", "size")


def table(rows: int, rng: np.random.Generator, shift: dict | None = None) -> dict[str, np.ndarray]:
    """Raw columns; `shift` {column: amount} moves a numeric column's location by `amount`
    of its sd, or a categorical column's first category's share up by `amount`."""
    shift = shift or {}
    s = lambda name: shift.get(name, 0.0)  # noqa: E731
    with_missing = rng.normal(5, 2, rows) + 2 * s("with_missing")
    with_missing[rng.random(rows) < 0.1] = np.nan
    columns = {
        "normal": rng.normal(0, 1, rows) + s("normal"),
        "lognormal": rng.lognormal(0, 0.5, rows) * np.exp(0.5 * s("lognormal")),
        "counts": rng.poisson(3 + 1.7 * s("counts"), rows).astype(np.float64),
        "with_missing": with_missing,
        "uniform": rng.uniform(0, 1, rows) + 0.29 * s("uniform"),
        "bimodal": np.where(rng.random(rows) < 0.5, -2, 2)
        + rng.normal(0, 1, rows)
        + 2.2 * s("bimodal"),
    }
    for name, levels in (("colour", ["red", "green", "blue", "grey"]), ("size", ["S", "M", "L"])):
        p = np.full(len(levels), 1.0 / len(levels))
        p[0] += s(name)
        columns[name] = np.array(rng.choice(levels, rows, p=p / p.sum()), object)
    return columns


def sample(columns: dict[str, np.ndarray]) -> Sample:
    """The columns as a drift Sample of features."""
    out = {}
    for name, values in columns.items():
        kind = "categorical" if name in CATEGORICAL else "numeric"
        out[name] = Column(name, kind, "feature", values)
    return Sample(out, rows=len(next(iter(columns.values()))))
