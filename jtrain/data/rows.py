"""Kinds of examples and how each becomes rows: the plug-in point for new data kinds.

A Task's `examples(spec, split)` returns one split of one source as an example set: token
documents (`jtrain.data.documents.Documents`: packed, cut or one per row) or fixed-shape
arrays (`jtrain.data.array_rows.ArrayExamples`: an image and its label, a table row). Each
example class is registered with a `RowBuilder` that knows how to turn it into endless shuffled
training rows and into fixed-shape evaluation batches; the pipeline only ever calls these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RowSettings:
    """What row builders read from the config and the task."""

    seq_len: int  # tokens per row (token examples)
    pad_id: int  # the tokenizer's PAD (token examples)
    packing: bool  # data.packing: several documents per row
    whole_examples: bool  # the task forbids cutting an example across rows
    where: str = ""  # the source, for error messages


class RowBuilder(Protocol):
    """How one kind of example set becomes training rows and evaluation batches."""

    def train_rows(self, examples, r: RowSettings, shuffle_seed: int, offset_seed: int):
        """An endless `grain.MapDataset` of rows, reshuffled every epoch."""
        ...

    def collate(self, r: RowSettings) -> Callable[[Any], Batch]:
        """Turns a batch of stacked training rows into the step's batch."""
        ...

    def eval_rows(self, examples, r: RowSettings) -> tuple[int, Callable[[np.ndarray], Batch]]:
        """(rows in the split, a function from row indices to a batch); indices past the end
        give padding rows whose loss weight is 0, so every batch has the same shape."""
        ...

    def epoch_rows(self, examples, r: RowSettings) -> int:
        """Training rows in one pass over the examples (what `train.epochs` counts)."""
        ...

    def concat(self, parts: Sequence) -> Any:
        """Several sources' example sets of one split as one, in order."""
        ...


_BUILDERS: dict[type, RowBuilder] = {}


def register(example_class: type, builder: RowBuilder) -> None:
    """Makes `builder` the row builder of `example_class` and its subclasses."""
    _BUILDERS[example_class] = builder


def builder_for(examples) -> RowBuilder:
    """The row builder registered for the class of `examples` (or a base class)."""
    _load_builtin()
    for cls in type(examples).__mro__:
        if cls in _BUILDERS:
            return _BUILDERS[cls]
    raise TypeError(
        f"{type(examples).__name__} is not a known kind of examples; a Task's examples() "
        "returns token Documents or ArrayExamples (or registers a row builder of its own)."
    )


def _load_builtin() -> None:
    from jtrain.data import array_rows, token_rows  # noqa: F401 - they register themselves
