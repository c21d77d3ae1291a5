"""A task of your own, end to end: regression on records your code makes.

    python -m jtrain.main --config=configs/default.py --workdir=runs/regression \
        --config.task=examples.regression:Regression \
        --config.data.source=python:examples.regression:records

`records(split)` returns that split's records (dicts); `Regression` turns them into arrays,
builds a small MLP, and says how its loss and metrics are computed. Everything else (the
step, sharding, checkpoints and exact resume, evaluation, logging) is jtrain's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtrain import tasks
from jtrain.data import sources
from jtrain.data.array_rows import ArrayExamples

FEATURES = 4
_SIZES = {"train": 2048, "val": 256, "test": 256}


def records(split: str) -> list[dict]:
    """y = sin(x0) + x1 * x2 - x3 / 2 + noise, for x uniform in [-2, 2]^4; a seed per split."""
    rng = np.random.default_rng(["train", "val", "test"].index(split))
    x = rng.uniform(-2.0, 2.0, size=(_SIZES[split], FEATURES))
    y = np.sin(x[:, 0]) + x[:, 1] * x[:, 2] - x[:, 3] / 2 + 0.05 * rng.normal(size=len(x))
    return [{"x": row.tolist(), "y": float(target)} for row, target in zip(x, y, strict=True)]


def _checked(record: dict) -> str:
    """Validates a record (a bad one is skipped and counted); its key when splits are hashed."""
    if len(record.get("x", ())) != FEATURES or not isinstance(record.get("y"), float):
        raise ValueError(f"a record needs x (a list of {FEATURES} numbers) and a float y")
    return repr(record)


class MLP(nnx.Module):
    """x [B, F] -> one prediction per example [B]."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(FEATURES, width, rngs=rngs)
        self.out = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x_BxF: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.hidden(x_BxF)))[:, 0]


class Regression(tasks.Task):
    """Mean squared error; reports RMSE and mean absolute error over whole splits."""

    width = 64

    def examples(self, spec, split: str) -> ArrayExamples:
        rows = sources.load_records(spec, split, _checked)
        return ArrayExamples(
            {
                "x": np.array([r["x"] for r in rows], np.float32).reshape(-1, FEATURES),
                "y": np.array([r["y"] for r in rows], np.float32),
            }
        )

    def make_model(self, rngs: nnx.Rngs) -> MLP:
        return MLP(self.width, rngs=rngs)

    def loss(self, model, batch, *, dropout_rng, frozen) -> tasks.LossOutput:
        weight = batch["loss_weight"]  # 0 on the padding rows of the last eval batch
        error = model(batch["x"]) - batch["y"]
        return tasks.LossOutput(
            loss_sum=jnp.sum(weight * error**2),
            weight=jnp.sum(weight),
            sums={"abs_error": jnp.sum(weight * jnp.abs(error))},
        )

    def report(self, totals) -> dict[str, float]:
        metrics = super().report(totals)
        metrics["rmse"] = math.sqrt(metrics["loss"])
        return metrics

    def flops_per_example(self, *, weight_grads: bool = True) -> float:
        weights = FEATURES * self.width + self.width
        return (6.0 if weight_grads else 4.0) * weights
