"""The Task: everything objective-specific that the generic step, loop and pipeline consult.

A Task turns a split's records into examples (`examples`), builds the model it trains
(`make_model`) and the frozen models its loss reads (`frozen_models`), computes additive loss
and metric sums over a batch (`loss`), turns summed totals into reported metrics (`report`),
counts its FLOPs and tokens per example (for MFU and throughput), and shows what a finished run
produced (`show`). Nothing outside `jtrain/tasks/` branches on which task runs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar

import jax
import numpy as np
from flax import nnx, struct

from jtrain.data import sources

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Batch = dict[str, jax.Array]


def section(config, name: str, defaults: dict) -> dict:
    """`config.<name>.*` with `defaults` for the keys (or the whole block) a config lacks."""
    block = config.get(name) or {}
    return {key: block.get(key, default) for key, default in defaults.items()}


@struct.dataclass
class LossOutput:
    """Additive sums over a batch, so micro-batches and eval batches combine exactly.

    The reported loss is loss_sum / weight; each entry of `sums` is reported as
    sums[name] / weight (e.g. accuracy = correct / target tokens). `outputs` holds per-example
    values [B, ...] for metrics that are not sums (ROC-AUC, R², a confusion matrix): evaluation
    gathers them over the whole split for `Task.report_outputs`; training ignores them.
    """

    loss_sum: jax.Array
    weight: jax.Array  # the summed loss weight: target tokens for language models
    sums: dict[str, jax.Array]
    outputs: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

    def __add__(self, other: LossOutput) -> LossOutput:
        """The sums added; per-example outputs are not sums, so they are left out."""
        add = functools.partial(jax.tree.map, lambda a, b: a + b)
        return LossOutput(
            self.loss_sum + other.loss_sum, self.weight + other.weight, add(self.sums, other.sums)
        )

    def summed(self) -> LossOutput:
        """Without the per-example outputs."""
        return self.replace(outputs={})


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
    # What the model must read: "tokens" (the transformer family) or "arrays" (the feature
    # dicts of tables and images); `model.kind` must name a family that reads it.
    model_reads: ClassVar[str] = "tokens"
    # The validation metric that picks the best checkpoint (checkpoint.keep_best), and
    # whether lower ("min") or higher ("max") is better; early stopping may name another.
    selection_metric: ClassVar[tuple[str, str]] = ("loss", "min")

    def __init__(self, config):
        self.config = config

    @classmethod
    def reads(cls, config) -> str:
        """What the model must read under `config`: the `model_reads` of the task whose model
        the run trains (`trains`: distillation's is the student's task)."""
        return cls.trains(config).model_reads

    @classmethod
    def trains(cls, config) -> type[Task]:
        """The task whose model a run of this task trains, as the model is used afterwards
        (prediction): this one, unless it wraps another (distillation: the student's task)."""
        return cls

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

    def artifacts(self, exp, previous: dict[str, dict]) -> dict[str, dict]:
        """JSON files a run keeps in its workdir (a table's preprocessing, a preference
        reference's log-probs), by file name, made when training or evaluation starts; the
        task uses them from then on.

        Every process calls it, so a task may compute on the devices of `exp` (the run's
        Experiment). `previous` holds those of `artifacts_names()` that the workdir has
        already (a resumed run): return one unchanged to keep it rather than recompute it.
        """
        return {}

    def artifacts_names(self) -> tuple[str, ...]:
        """The file names `artifacts()` writes (known without reading any data)."""
        return ()

    def load_artifacts(self, files: dict[str, dict]) -> None:
        """Takes back a finished run's `artifacts()` (prediction on new data): `files` holds
        those the workdir has; raise `CheckpointError` if one the task needs is missing."""

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

    def report_outputs(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics that are not sums, from the per-example `LossOutput.outputs` of a whole
        split (host arrays, every example once, padding rows included: weight them out)."""
        return {}

    def save_outputs(self, outputs: dict[str, np.ndarray], stem: str) -> None:
        """Writes files about an evaluation (a confusion matrix) to paths starting with
        `stem` (e.g. WORKDIR/eval/val); nothing by default."""

    # Accounting and display.

    def flops_per_example(self, *, weight_grads: bool = True) -> float:
        """Training FLOPs per example, for MFU (weight_grads=False: a frozen base); 0 = unknown."""
        return 0.0

    def tokens_per_example(self) -> int:
        """Tokens an example feeds the model (0 for tasks without tokens), for tokens/s."""
        return 0

    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], str]] | None:
        """{key: (shape, dtype)} of a global training batch, for compiling the step ahead of
        time without data (`jtrain.aot`); None: only the data pipeline knows."""
        return None

    def batch_source(self, exp, workdir: str):
        """Where training batches come from when not from the input pipeline (RL: rollouts
        sampled from the current weights), a `jtrain.loop.BatchSource`; None = the pipeline."""
        return None

    def evaluate(self, exp, state, split: str) -> dict[str, float] | None:
        """A split's metrics when they are not the loss over its batches (RL: the rewards of
        the model's completions of its prompts); None = the default loss evaluation."""
        return None

    def generation_set(self, split: str, limit: int) -> GenerationSet | None:
        """Up to `limit` prompts of a split with reference answers, for generation metrics
        (exact match, BLEU, chrF, ROUGE-L); None when the task's examples have none."""
        return None

    def show(self, model: nnx.Module) -> None:
        """Prints what a finished run produced (an LM prints a sample); nothing by default."""

    def figures(self, workdir: str) -> dict[str, Figure]:
        """Figures of a finished training run (a confusion matrix, say) by name, which process
        0 saves as WORKDIR/plots/NAME.png next to curves.png; none by default."""
        return {}
