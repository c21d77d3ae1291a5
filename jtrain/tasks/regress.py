"""Regression on tables and images: one value per example, MSE or Huber loss.

The target is standardised with the train split's mean and standard deviation (saved in
preprocessing.json), so one learning rate suits targets of any scale; the loss is on that
scale. Validation and test events add MSE, RMSE, MAE and R² in the target's own units, exact
over the whole split (`jtrain.supervised_metrics`).

Keys (`config.regress.*`; a config without the block takes these defaults):
  loss: "mse"        mse | huber
  huber_delta: 1.0   huber: quadratic below this error (in standard deviations), linear above
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jtrain import supervised_metrics, tasks
from jtrain.tasks.base import Batch, LossOutput
from jtrain.tasks.supervised import SupervisedTask, model_inputs, real_rows, section
from jtrain.validation import one_of, require

_DEFAULTS = {"loss": "mse", "huber_delta": 1.0}


def _huber(error: jnp.ndarray, delta: float) -> jnp.ndarray:
    small = jnp.abs(error) <= delta
    return jnp.where(small, 0.5 * error**2, delta * (jnp.abs(error) - 0.5 * delta))


LOSSES = {"mse": lambda error, delta: error**2, "huber": _huber}


def settings(config) -> dict:
    return section(config, "regress", _DEFAULTS)


@tasks.register("regress")
class RegressTask(SupervisedTask):
    """Batch keys: the model's inputs, `target` float32 [B] (standardised), `loss_weight`."""

    name = "regress"
    objective = "regress"
    outputs = 1

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        s = settings(config)
        one_of("regress.loss", s["loss"], LOSSES)
        require(s["huber_delta"] > 0, "regress.huber_delta", s["huber_delta"], "must be > 0")

    def loss(self, model, batch: Batch, *, dropout_rng=None, frozen=None) -> LossOutput:
        s = settings(self.config)
        weight = batch["loss_weight"].astype(jnp.float32)
        prediction = model(model_inputs(batch), dropout_rng=dropout_rng)[:, 0]
        per_example = LOSSES[s["loss"]](prediction - batch["target"], s["huber_delta"])
        return LossOutput(
            loss_sum=jnp.sum(weight * per_example),
            weight=jnp.sum(weight),
            sums={},
            outputs={"prediction": prediction, "target": batch["target"], "weight": weight},
        )

    def report_outputs(self, outputs) -> dict[str, float]:
        rows = real_rows(outputs)
        to_units = self.preprocessor.target_to_original
        predictions = to_units(rows["prediction"].astype(np.float64))
        targets = to_units(rows["target"].astype(np.float64))
        return supervised_metrics.regression(predictions, targets)
