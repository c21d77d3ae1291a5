"""Fixed-shape examples (a feature vector and a target, an image and its label): one per row.

A Task turns records into `ArrayExamples`, named arrays with one leading row per example.
Training shuffles the examples every epoch; evaluation walks them in order and pads the last
batch with zero rows whose `loss_weight` is 0, so every batch has one shape and every example
counts exactly once. Each row carries `loss_weight` 1.0, for the task's loss to weight by.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import grain
import numpy as np

from jtrain.data import rows

Batch = dict[str, np.ndarray]
WEIGHT = "loss_weight"


Augment = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


class ArrayExamples:
    """Named arrays [N, ...], row i of each being example i.

    `augment(row, rng)`, if given, transforms each training row (never an evaluation row) with
    a generator seeded by the run's seed and the row's position in the endless stream, so the
    same step sees the same augmentation after a resume. It must be picklable (a module-level
    function or an object) for `data.workers > 0`, and keep every array's shape and dtype.
    """

    def __init__(self, features: Mapping[str, np.ndarray], *, augment: Augment | None = None):
        self.augment = augment
        arrays = {name: np.asarray(value) for name, value in features.items()}
        sizes = {name: a.shape[0] if a.ndim else None for name, a in arrays.items()}
        if not arrays or len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(
                f"ArrayExamples needs arrays with one common leading size; got sizes {sizes}"
            )
        if WEIGHT in arrays:
            raise ValueError(f"{WEIGHT!r} is added by the pipeline; name the feature otherwise")
        self.features = arrays
        for array in arrays.values():
            array.setflags(write=False)  # shared by every pipeline in the process

    def __len__(self) -> int:
        return next(iter(self.features.values())).shape[0]

    def rows(self, indices: np.ndarray) -> Batch:
        """Rows at `indices` (those past the end: zeros with loss weight 0), stacked."""
        indices = np.asarray(indices)
        valid = indices < len(self)
        batch = {}
        for name, array in self.features.items():
            batch[name] = np.zeros((indices.size, *array.shape[1:]), array.dtype)
            batch[name][valid] = array[indices[valid]]
        batch[WEIGHT] = valid.astype(np.float32)
        return batch


class _Row:
    """Example i as a dict of arrays (picklable, for Grain worker processes)."""

    def __init__(self, examples: ArrayExamples):
        self.examples = examples

    def __call__(self, index: int) -> Batch:
        row = {name: array[index] for name, array in self.examples.features.items()}
        row[WEIGHT] = np.float32(1.0)
        return row


def _stacked(batch: Batch) -> Batch:
    return batch  # Grain's batch already stacks each named array


class ArrayRows:
    """The row builder of `ArrayExamples`."""

    def train_rows(self, examples: ArrayExamples, r: rows.RowSettings, shuffle_seed, offset_seed):
        if not len(examples):
            raise ValueError(f"{r.where} has no examples; check the data.")
        rows_ = (
            grain.MapDataset.range(len(examples))
            .shuffle(seed=shuffle_seed)
            .repeat()  # reseeds the shuffle every epoch
            .map(_Row(examples))
        )
        if examples.augment is None:
            return rows_
        return rows_.random_map(examples.augment, seed=offset_seed)

    def epoch_rows(self, examples: ArrayExamples, r: rows.RowSettings) -> int:
        return len(examples)

    def collate(self, r: rows.RowSettings):
        return _stacked

    def eval_rows(self, examples: ArrayExamples, r: rows.RowSettings):
        return len(examples), examples.rows

    def concat(self, parts: Sequence[ArrayExamples]) -> ArrayExamples:
        names = set(parts[0].features)
        if any(set(p.features) != names for p in parts):
            raise ValueError("the sources of a mixture give examples with different features")
        augment = parts[0].augment  # one task made them all
        return ArrayExamples(
            {n: np.concatenate([p.features[n] for p in parts]) for n in names}, augment=augment
        )


rows.register(ArrayExamples, ArrayRows())
