"""What classification and regression share: tables and images in, one prediction per example.

Examples come from a supervised source (`jtrain.data.supervised`: `sklearn:NAME`, `csv:PATH`,
`parquet:PATH`, `images:DIR`). Their preprocessing (normalisation, category vocabularies,
the class list, the target's statistics) is fitted on the train split only, applied to every
split, and saved in the workdir as `preprocessing.json` so `jtrain.predict` applies exactly
the same to new data. The model is a family with a scores head (`mlp`, `cnn`, `vit`) built to
fit the data's `InputSpec`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np
from flax import nnx

from jtrain import console, models
from jtrain.checkpoint import CheckpointError
from jtrain.data import sources, supervised
from jtrain.data.array_rows import ArrayExamples
from jtrain.data.augment import ImageAugment
from jtrain.data.features import Preprocessor
from jtrain.tasks.base import Task, section
from jtrain.validation import ConfigError, require

INPUT_KEYS = ("numeric", "categorical", "image")
PREPROCESSING = "preprocessing.json"
_AUGMENT_DEFAULTS = {
    "crop_padding": 0,
    "flip": False,
    "color_jitter": 0.0,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
}


def model_inputs(batch) -> dict[str, jax.Array]:
    """The arrays of a batch the model reads."""
    return {key: batch[key] for key in INPUT_KEYS if key in batch}


def data_keys(config) -> dict:
    """The `data.*` keys a supervised source reads."""
    features = config.data.get("features", "")
    return {
        "target": config.data.get("target", ""),
        "features": tuple(f.strip() for f in features.split(",") if f.strip()),
        "image_size": int(config.model.get("image_size", 32)),
    }


def augment_settings(config) -> dict:
    """`config.augment.*` with defaults (all off)."""
    return section(config, "augment", _AUGMENT_DEFAULTS)


class SupervisedTask(Task):
    """Base of `classify` and `regress`; subclasses define the loss and the metrics."""

    objective: ClassVar[str] = ""  # the Preprocessor's: "classify" | "regress"
    model_reads = "arrays"

    def __init__(self, config):
        super().__init__(config)
        self._preprocessor: Preprocessor | None = None

    @classmethod
    def validate(cls, config) -> None:
        keys = data_keys(config)
        supervised.check_source(
            config.data.source, target=keys["target"], features=keys["features"]
        )
        a = augment_settings(config)
        for key in ("crop_padding", "color_jitter", "mixup_alpha", "cutmix_alpha"):
            require(a[key] >= 0, f"augment.{key}", a[key], "must be >= 0 (0 = off)")
        require(a["color_jitter"] < 1, "augment.color_jitter", a["color_jitter"], "must be < 1")

    def source_specs(self, source: str) -> tuple[sources.SourceSpec, ...]:
        if not supervised.is_supervised(source):
            supervised.check_source(source, target="", features=())  # raises, listing kinds
        return (sources.SourceSpec("supervised", source),)

    # Data.

    def raw(self, split: str) -> supervised.RawSplit:
        return supervised.load_split(self.config.data.source, split, **data_keys(self.config))

    @property
    def preprocessor(self) -> Preprocessor:
        """Fitted on the train split (or set from a finished run's preprocessing.json)."""
        if self._preprocessor is None:
            self._preprocessor = Preprocessor.fit(self.raw("train"), objective=self.objective)
        return self._preprocessor

    def examples(self, spec: sources.SourceSpec, split: str) -> ArrayExamples:
        arrays, report = self.preprocessor.transform(self.raw(split))
        dropped = report.get("dropped", 0)
        if dropped:
            console.status(f"jtrain: {split} split: {report.get('message', dropped)}")
        if not len(next(iter(arrays.values()))):
            raise ValueError(f"the {split} split of data.source={spec} has no examples")
        return ArrayExamples(arrays, augment=self._augment(arrays))

    def _augment(self, arrays) -> ImageAugment | None:
        a = augment_settings(self.config)
        host = ImageAugment(a["crop_padding"], bool(a["flip"]), float(a["color_jitter"]))
        if not host.active:
            return None
        if "image" not in arrays:
            raise ConfigError(
                "config.augment.crop_padding/flip/color_jitter are for images; "
                f"data.source={self.config.data.source!r} is a table: set them to 0."
            )
        return host

    def artifacts(self, exp, previous: dict[str, dict]) -> dict[str, dict]:
        return {PREPROCESSING: self.preprocessor.to_json()}  # refitted: cheap and deterministic

    def artifacts_names(self) -> tuple[str, ...]:
        return (PREPROCESSING,)

    def load_artifacts(self, files: dict[str, dict]) -> None:
        if PREPROCESSING not in files:
            raise CheckpointError(
                f"the run's {PREPROCESSING} is missing: the run saved it in its workdir when "
                "training started; without it the run's preprocessing cannot be applied to new "
                "data."
            )
        self._preprocessor = Preprocessor.from_json(files[PREPROCESSING])

    # Model.

    @property
    def outputs(self) -> int:
        """Scores per example: one per class, or one value."""
        raise NotImplementedError

    def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
        family = models.family_of(self.config.model)
        spec = self.preprocessor.input_spec()
        return family.make(
            self.config.model, head="scores", rngs=rngs, outputs=self.outputs, inputs=spec
        )

    def flops_per_example(self, *, weight_grads: bool = True) -> float:
        family = models.family_of(self.config.model)
        spec = self.preprocessor.input_spec()
        forward = family.forward_flops(self.config.model, spec, self.outputs)
        return (3.0 if weight_grads else 2.0) * forward


def real_rows(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-example outputs without the padding rows of the last evaluation batch."""
    keep = np.asarray(outputs["weight"]) > 0
    return {name: np.asarray(values)[keep] for name, values in outputs.items()}


@dataclasses.dataclass(frozen=True)
class Mixing:
    """`augment.mixup_alpha` / `augment.cutmix_alpha` (device-side, images only)."""

    mixup_alpha: float
    cutmix_alpha: float

    @classmethod
    def from_config(cls, config) -> Mixing:
        a = augment_settings(config)
        return cls(float(a["mixup_alpha"]), float(a["cutmix_alpha"]))

    @property
    def active(self) -> bool:
        return bool(self.mixup_alpha or self.cutmix_alpha)
