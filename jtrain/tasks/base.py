"""The Task protocol: what a training objective supplies to the generic step and loop."""

from __future__ import annotations

from typing import Protocol

import jax
from flax import nnx, struct

Batch = dict[str, jax.Array]


@struct.dataclass
class LossOutput:
    """Additive sums over a batch, so micro-batches and eval batches combine exactly.

    The reported loss is loss_sum / weight; each entry of `sums` is reported as
    sums[name] / weight (e.g. accuracy = correct / tokens).
    """

    loss_sum: jax.Array
    weight: jax.Array
    sums: dict[str, jax.Array]

    def __add__(self, other: LossOutput) -> LossOutput:
        return jax.tree.map(lambda a, b: a + b, self, other)


class Task(Protocol):
    """A model and the loss that trains it; the loop and the step never branch on the kind."""

    def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A freshly initialised model; every parameter is an nnx.Param with logical axes."""
        ...

    def loss(self, model: nnx.Module, batch: Batch, *, dropout_rng: jax.Array | None) -> LossOutput:
        """Sums of the loss and metrics over the batch; dropout only when dropout_rng is set."""
        ...

    def flops_per_token(self, seq_len: int, *, weight_grads: bool = True) -> float:
        """Training FLOPs per token, for the MFU estimate (weight_grads=False: frozen base)."""
        ...
