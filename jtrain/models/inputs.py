"""What a supervised model reads: the shape of its inputs, known only once the data is read.

Language models take token ids; the image and table families (`mlp`, `cnn`, `vit`) take a
batch dict whose arrays depend on the dataset: how many numeric columns, how many categories
each categorical column has, the image size. The data's preprocessing computes an `InputSpec`
from the train split and the family builds its model to fit it.

Batch keys a supervised model reads (each present only when the spec says so):
  "numeric":     float32 [B, numeric]           standardised numeric columns
  "categorical": int32   [B, len(categories)]   category ids, 0 = unknown or missing
  "image":       float32 [B, H, W, C]           pixel values scaled to [0, 1]
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The inputs of one dataset, as the model sees them."""

    numeric: int = 0  # numeric feature columns (missing-value indicators included)
    categories: tuple[int, ...] = ()  # per categorical column: ids including 0 = unknown
    image_shape: tuple[int, int, int] | None = None  # (height, width, channels)

    def __post_init__(self):
        if self.image_shape is None and not (self.numeric or self.categories):
            raise ValueError("an InputSpec needs numeric or categorical columns, or an image")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> InputSpec:
        shape = values.get("image_shape")
        return cls(
            numeric=int(values.get("numeric", 0)),
            categories=tuple(int(n) for n in values.get("categories", ())),
            image_shape=tuple(int(n) for n in shape) if shape else None,
        )
