"""The reference profile of a run: what its train split and its model's outputs on it looked
like, saved as WORKDIR/drift/profile.json (summaries, readable) and profile.npz (a capped
random sample of every column, for the two-sample tests and the domain classifier).

A `Sample` is a set of named columns (numeric, categorical, or per-document token counts),
each with a role (a data `feature`, the model's `prediction`, its `loss`), plus an optional
matrix the domain classifier reads (`embedding`). The task's profiler (`profilers`) makes one
from the train split for the profile and one from new data for the report, with the same
columns, so the report compares like with like.

The sample is capped at `SAMPLE_CAP` rows: a two-sample test's power is set by the smaller
side, and new batches are rarely larger, so 5000 reference rows lose little, and keep the
file small (8 bytes a numeric cell before compression: 1.2 MB for 30 columns) and the domain
classifier's fits quick. The summaries are
of the whole train split.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from jtrain import atomic
from jtrain.errors import UserError

SAMPLE_CAP = 5000
DIRECTORY = "drift"
JSON, NPZ = "profile.json", "profile.npz"
FORMAT = 1
QUANTILES = np.linspace(0, 1, 21)  # a 20-bin equal-mass histogram
TOP_CATEGORIES = 100


class ProfileError(UserError, ValueError):
    """No usable profile, or new data that cannot be compared with it."""


@dataclasses.dataclass
class Column:
    """One column of a sample: numeric float64 (NaN = missing), categorical (str or None),
    or tokens (int counts [documents, vocabulary])."""

    name: str
    kind: str  # "numeric" | "categorical" | "tokens"
    role: str  # "feature" | "prediction" | "loss" | "length"
    values: np.ndarray


@dataclasses.dataclass
class Sample:
    """Columns of equal length (rows), an optional [rows, d] encoding for the domain
    classifier, and how many rows there were before any cap."""

    columns: dict[str, Column]
    embedding: np.ndarray | None = None
    rows: int = 0
    meta: dict = dataclasses.field(default_factory=dict)

    def capped(self, cap: int, seed: int = 0) -> Sample:
        """A random `cap` rows of every column (the same rows), or all when fewer."""
        n = len(next(iter(self.columns.values())).values) if self.columns else 0
        if n <= cap:
            return dataclasses.replace(self, rows=self.rows or n)
        keep = np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
        columns = {
            k: dataclasses.replace(c, values=c.values[keep]) for k, c in self.columns.items()
        }
        embedding = None if self.embedding is None else self.embedding[keep]
        return Sample(columns, embedding, self.rows or n, self.meta)


def summary(column: Column) -> dict:
    """What the profile's JSON says of a column: quantiles, frequencies, missing rate."""
    values = column.values
    if column.kind == "numeric":
        finite = values[np.isfinite(values)]
        out = {"missing": float(1 - len(finite) / max(len(values), 1))}
        if len(finite):
            out.update(mean=float(finite.mean()), std=float(finite.std()))
            out["quantiles"] = [float(q) for q in np.quantile(finite, QUANTILES)]
        return out
    if column.kind == "categorical":
        names, counts = np.unique([str(v) for v in values if v is not None], return_counts=True)
        order = np.argsort(-counts)[:TOP_CATEGORIES]
        total = max(len(values), 1)
        return {
            "missing": float(sum(v is None for v in values) / total),
            "categories": len(names),
            "frequencies": {str(names[i]): float(counts[i] / total) for i in order},
        }
    totals = values.sum(axis=0)
    return {
        "documents": len(values),
        "tokens": int(totals.sum()),
        "distinct": int((totals > 0).sum()),
    }


def directory(workdir: str) -> str:
    return os.path.join(workdir, DIRECTORY)


def save(workdir: str, full: Sample, meta: dict) -> str:
    """Writes the profile of `full` (summaries of all rows, a sample of SAMPLE_CAP) to
    WORKDIR/drift/; the JSON last, so its presence means the profile is whole."""
    sample = full.capped(SAMPLE_CAP)
    arrays, columns = {}, []
    for i, column in enumerate(sample.columns.values()):
        if column.kind == "categorical":
            arrays[f"{i}.missing"] = np.array([v is None for v in column.values], bool)
            arrays[f"{i}"] = np.array(["" if v is None else str(v) for v in column.values], str)
        else:
            arrays[f"{i}"] = np.asarray(column.values)
        columns.append(
            {
                "name": column.name,
                "kind": column.kind,
                "role": column.role,
                **summary(full.columns[column.name]),
            }
        )
    if sample.embedding is not None:
        arrays["embedding"] = np.asarray(sample.embedding, np.float32)
    path = os.path.join(directory(workdir), NPZ)

    def write_npz(temporary: str) -> None:
        with open(temporary, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic.write(path, write_npz)
    content = {
        "format": FORMAT,
        **meta,
        "rows": full.rows or len(next(iter(full.columns.values())).values),
        "sample_rows": len(next(iter(sample.columns.values())).values),
        "sample_cap": SAMPLE_CAP,
        "columns": columns,
        "extra": full.meta,
    }
    atomic.write_json(os.path.join(directory(workdir), JSON), content)
    return os.path.join(directory(workdir), JSON)


def load(workdir: str) -> tuple[dict, Sample]:
    """The profile's JSON and its reference sample; ProfileError when there is none."""
    json_path = os.path.join(directory(workdir), JSON)
    npz_path = os.path.join(directory(workdir), NPZ)
    if not os.path.isfile(json_path) or not os.path.isfile(npz_path):
        raise ProfileError(
            f"{workdir} has no drift profile ({json_path} is missing): the run was made by an "
            "older jtrain or did not finish; write one with "
            f"`python -m jtrain.drift --workdir={workdir} --write_profile`"
        )
    try:
        with open(json_path) as f:
            content = json.load(f)
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise ProfileError(
            f"cannot read the drift profile in {directory(workdir)} ({err}); "
            f"write it again with `python -m jtrain.drift --workdir={workdir} "
            "--write_profile`"
        ) from err
    if content.get("format") != FORMAT:
        raise ProfileError(
            f"{json_path} has format {content.get('format')!r}, this jtrain reads "
            f"{FORMAT}: write it again with --write_profile"
        )
    columns = {}
    for i, entry in enumerate(content["columns"]):
        values = arrays[f"{i}"]
        if entry["kind"] == "categorical":
            missing = arrays[f"{i}.missing"]
            values = np.array(
                [None if gone else str(v) for v, gone in zip(values, missing, strict=True)], object
            )
        columns[entry["name"]] = Column(entry["name"], entry["kind"], entry["role"], values)
    sample = Sample(
        columns, arrays.get("embedding"), int(content["rows"]), content.get("extra", {})
    )
    return content, sample
