"""Classification of tables and images: softmax cross-entropy with optional label smoothing,
class weights, and mixup/CutMix for images.

Train events report the loss and accuracy; validation and test events add the exact metrics
of the whole split (`jtrain.supervised_metrics`: top-k accuracy, precision, recall and F1,
ROC-AUC, log-loss), and each evaluation writes its confusion matrix to
WORKDIR/eval/<split>_confusion_matrix.{json,png}.

Keys (`config.classify.*`; a config without the block takes these defaults):
  label_smoothing: 0.0   the target puts 1 - s on the label and s / classes on every class
  class_weights: ""      "" (none) | "balanced" (n / (classes * count), from the train
                         split) | comma-separated weights, one per class in class order
  top_k: 5               the k of top-k accuracy (reported when 1 < k < classes)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jtrain import supervised_metrics, tasks
from jtrain.tasks import mixing
from jtrain.tasks.base import Batch, LossOutput
from jtrain.tasks.supervised import Mixing, SupervisedTask, model_inputs, real_rows, section
from jtrain.validation import ConfigError, require

_DEFAULTS = {"label_smoothing": 0.0, "class_weights": "", "top_k": 5}


def settings(config) -> dict:
    return section(config, "classify", _DEFAULTS)


@tasks.register("classify")
class ClassifyTask(SupervisedTask):
    """Batch keys: the model's inputs, `label` int32 [B], `loss_weight` [B]."""

    name = "classify"
    objective = "classify"

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        s = settings(config)
        smoothing = s["label_smoothing"]
        require(0 <= smoothing < 1, "classify.label_smoothing", smoothing, "must be in [0, 1)")
        require(s["top_k"] >= 1, "classify.top_k", s["top_k"], "must be >= 1")

    @property
    def outputs(self) -> int:
        return len(self.preprocessor.classes)

    def make_model(self, rngs):
        _ = self.class_weights  # a bad classify.class_weights fails here, before any compile
        return super().make_model(rngs)

    @functools.cached_property
    def class_weights(self) -> np.ndarray:
        """One weight per class (ones unless `classify.class_weights` says otherwise); worked
        out once: "balanced" counts the whole train split."""
        spec, classes = settings(self.config)["class_weights"], self.preprocessor.classes
        if not spec:
            return np.ones(len(classes), np.float32)
        if spec == "balanced":  # scikit-learn's definition, on the train split
            labels = self.examples(None, "train").features["label"]
            counts = np.bincount(labels, minlength=len(classes)).astype(np.float64)
            return (len(labels) / (len(classes) * np.maximum(counts, 1))).astype(np.float32)
        try:
            weights = np.array([float(w) for w in spec.split(",")], np.float32)
        except ValueError:
            weights = np.array([], np.float32)
        if len(weights) != len(classes) or (weights < 0).any():
            raise ConfigError(
                f"config.classify.class_weights={spec!r} is invalid: give {len(classes)} "
                f"non-negative numbers, one per class ({', '.join(classes)}), or 'balanced'."
            )
        return weights

    def loss(self, model, batch: Batch, *, dropout_rng=None, frozen=None) -> LossOutput:
        s, num_classes = settings(self.config), self.outputs
        labels, weight = batch["label"], batch["loss_weight"].astype(jnp.float32)
        inputs = model_inputs(batch)
        targets = jax.nn.one_hot(labels, num_classes)
        mix = Mixing.from_config(self.config)
        model_rng = dropout_rng
        if dropout_rng is not None and mix.active and "image" in inputs:
            mix_rng, model_rng = jax.random.split(dropout_rng)
            inputs["image"], targets = mixing.mix(mix_rng, inputs["image"], targets, **vars(mix))
        smoothing = s["label_smoothing"]
        targets = targets * (1 - smoothing) + smoothing / num_classes
        logits = model(inputs, dropout_rng=model_rng)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.sum(targets * log_probs, axis=-1)
        example_weight = weight * jnp.asarray(self.class_weights)[labels]
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return LossOutput(
            loss_sum=jnp.sum(example_weight * nll),
            weight=jnp.sum(example_weight),
            sums={"correct": jnp.sum(weight * correct), "examples": jnp.sum(weight)},
            outputs={"probs": jnp.exp(log_probs), "label": labels, "weight": weight},
        )

    def report(self, totals: LossOutput) -> dict[str, float]:
        weight = max(float(totals.weight), 1e-12)
        examples = max(float(totals.sums["examples"]), 1.0)
        return {
            "loss": float(totals.loss_sum) / weight,
            "accuracy": float(totals.sums["correct"]) / examples,
            "loss_weight": float(totals.weight),
        }

    def report_outputs(self, outputs) -> dict[str, float]:
        rows = real_rows(outputs)
        probs = rows["probs"].astype(np.float64)
        probs /= probs.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 +- 1e-7
        top_k = int(settings(self.config)["top_k"])
        return supervised_metrics.classification(probs, rows["label"], top_k=top_k)

    def save_outputs(self, outputs, stem: str) -> None:
        rows = real_rows(outputs)
        predicted = np.argmax(rows["probs"], axis=1)
        matrix = supervised_metrics.confusion_matrix(predicted, rows["label"], self.outputs)
        supervised_metrics.save_confusion_matrix(
            matrix, self.preprocessor.classes, f"{stem}_confusion_matrix"
        )
