"""The Task: everything objective-specific that the generic step, loop and pipeline consult.

A Task turns a split's records into examples (`examples`), builds the model it trains
(`make_model`) and the frozen models its loss reads (`frozen_models`), computes additive loss
and metric sums over a batch (`loss`), turns summed totals into reported metrics (`report`),
counts its FLOPs and tokens per example (for MFU and throughput), and shows what a finished run
produced (`show`). Nothing outside `jtrain/tasks/` branches on which task runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import ClassVar

import jax
from flax import nnx, struct

from jtrain.data import sources

Batch = dict[str, jax.Array]


@struct.dataclass
class LossOutput:
    """Additive sums over a batch, so micro-batches and eval batches combine exactly.

    The reported loss is loss_sum / weight; each entry of `sums` is reported as
    sums[name] / weight (e.g. accuracy = correct / target tokens).
    """

    loss_sum: jax.Array
    weight: jax.Array  # the summed loss weight: target tokens for language models
    sums: dict[str, jax.Array]

    def __add__(self, other: LossOutput) -> LossOutput:
        return jax.tree.map(lambda a, b: a + b, self, other)


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    """A model a task's loss reads but never trains: a preference reference, a teacher.

    Built by `make`, loaded from `init_from` (a jtrain workdir, `hf:PATH`, or "" for the
    run's own `model.init_from`; the seed's initialisation when both are empty). It is never
    checkpointed: a resumed run loads it again from the same place.
    """

    make: Callable[[nnx.Rngs], nnx.Module]
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class GenerationSet:
    """Prompts to complete and the reference each completion is scored against."""

    prompts: list[list[int]]  # token ids, ready for the sampler
    references: list[str]
    stop_ids: tuple[int, ...]
    decode: Callable[[list[int]], str]  # completion ids (stop token excluded) -> text


class Task:
    """Base of every objective; subclasses override what differs from these defaults."""

    name: ClassVar[str] = ""
    # Whether an example may be cut across rows (plain documents) or must stay whole in one
    # row (chat examples, whose loss weights are tied to their rendering).
    splittable_examples: ClassVar[bool] = True

    def __init__(self, config):
        self.config = config

    @classmethod
    def validate(cls, config) -> None:
        """Raises ValueError naming a task-specific config key whose value cannot work."""

    # Data: records of a split -> examples.

    def source_specs(self, source: str) -> tuple[sources.SourceSpec, ...]:
        """The sources `data.source` names (any registered set, files:, python:, mixtures)."""
        return sources.parse_spec(source)

    def examples(self, spec: sources.SourceSpec, split: str):
        """One split of one source as an example set: token `Documents` or `ArrayExamples`
        (`jtrain.data.rows`); read the records with `sources.load_records`."""
        raise NotImplementedError(f"task {type(self).__name__} defines no examples()")

    # Model and loss.

    def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A freshly initialised model; every parameter is an nnx.Param with logical axes."""
        raise NotImplementedError

    def frozen_models(self) -> Mapping[str, FrozenModel]:
        """Models the loss reads without training them, by name (none by default)."""
        return {}

    def loss(
        self,
        model: nnx.Module,
        batch: Batch,
        *,
        dropout_rng: jax.Array | None,
        frozen: Mapping[str, nnx.Module],
    ) -> LossOutput:
        """Sums of the loss and metrics over the batch; dropout only when dropout_rng is set."""
        raise NotImplementedError

    def report(self, totals: LossOutput) -> dict[str, float]:
        """Reported metrics from totals summed over batches (host values)."""
        weight = max(float(totals.weight), 1.0)
        metrics = {"loss": float(totals.loss_sum) / weight}
        metrics.update({name: float(value) / weight for name, value in totals.sums.items()})
        metrics["loss_weight"] = float(totals.weight)
        return metrics

    # Accounting and display.

    def flops_per_example(self, *, weight_grads: bool = True) -> float:
        """Training FLOPs per example, for MFU (weight_grads=False: a frozen base); 0 = unknown."""
        return 0.0

    def tokens_per_example(self) -> int:
        """Tokens an example feeds the model (0 for tasks without tokens), for tokens/s."""
        return 0

    def generation_set(self, split: str, limit: int) -> GenerationSet | None:
        """Up to `limit` prompts of a split with reference answers, for generation metrics
        (exact match, BLEU, chrF, ROUGE-L); None when the task's examples have none."""
        return None

    def show(self, model: nnx.Module) -> None:
        """Prints what a finished run produced (an LM prints a sample); nothing by default."""
