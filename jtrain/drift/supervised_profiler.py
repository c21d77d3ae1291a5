"""Profiles of classify and regress runs: a table's raw columns, or an image's per-channel
pixel statistics and the model's penultimate features; and the model's predictions.

New data is read as `jtrain.predict` reads it (`tables.read_features` with the kinds the run's
preprocessing fitted, `image_folder.read_images` at the run's size), and predicted with its
`Predictor`, so the report sees what serving would.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from jtrain import predict
from jtrain.data import image_folder, tables
from jtrain.data.features import IMAGE, Preprocessor
from jtrain.drift.profile import Column, ProfileError, Sample
from jtrain.drift.profilers import register

_CHANNELS = ("red", "green", "blue")
_TABLE_PREFIXES = ("csv:", "parquet:")


def _columns(pre: Preprocessor, features: dict[str, np.ndarray]) -> dict[str, Column]:
    """The raw feature columns, or per-image channel means and spreads."""
    if pre.image_shape is not None:
        images = np.asarray(features[IMAGE], np.float64)
        out = {}
        for c in range(images.shape[-1]):
            name = _CHANNELS[c] if images.shape[-1] == 3 else f"channel{c}"
            out[f"{name}_mean"] = Column(
                f"{name}_mean", "numeric", "feature", images[..., c].mean(axis=(1, 2))
            )
            out[f"{name}_std"] = Column(
                f"{name}_std", "numeric", "feature", images[..., c].std(axis=(1, 2))
            )
        return out
    out = {
        c.name: Column(c.name, "numeric", "feature", np.asarray(features[c.name], np.float64))
        for c in pre.numeric
    }
    for c in pre.categorical:
        values = np.array([None if v is None else str(v) for v in features[c.name]], object)
        out[c.name] = Column(c.name, "categorical", "feature", values)
    return out


def _predictions(
    pre: Preprocessor, model, arrays: dict
) -> tuple[dict[str, Column], np.ndarray | None]:
    """The model's outputs as columns, and its penultimate features where it gives them."""
    values = predict.Predictor(pre, model, predict.BATCH_SIZE)(arrays)
    if pre.objective == "classify":
        classes = np.array([pre.classes[i] for i in np.argmax(values, axis=1)], object)
        columns = {
            "predicted_class": Column("predicted_class", "categorical", "prediction", classes),
            "confidence": Column(
                "confidence", "numeric", "prediction", values.max(axis=1).astype(np.float64)
            ),
        }
    else:
        units = pre.target_to_original(values)
        columns = {"predicted": Column("predicted", "numeric", "prediction", units)}
    return columns, _penultimate(model, arrays)


def _penultimate(model, arrays: dict) -> np.ndarray | None:
    """The model's features before its head [N, d], batched, where the model has `features`."""
    if IMAGE not in arrays or not hasattr(model, "features"):
        return None
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s).features({IMAGE: x}))
    images, size = arrays[IMAGE], predict.BATCH_SIZE
    out = []
    for start in range(0, len(images), size):
        batch = images[start : start + size]
        padded = np.zeros((size, *images.shape[1:]), images.dtype)  # one shape: one compile
        padded[: len(batch)] = batch
        out.append(np.asarray(forward(state, padded))[: len(batch)])
    return np.concatenate(out).astype(np.float64)


def _sample(pre: Preprocessor, model, features: dict, meta: dict) -> Sample:
    arrays = pre.transform_features(features)
    columns = _columns(pre, features)
    predicted, embedding = _predictions(pre, model, arrays)
    columns.update(predicted)
    return Sample(columns, embedding, len(next(iter(arrays.values()))), meta)


@register("classify", "regress")
class SupervisedProfiler:
    """Tables and images of the supervised tasks."""

    def reference(self, task, model) -> Sample:
        raw = task.raw("train")
        return _sample(task.preprocessor, model, raw.features, {"bad_rows": raw.bad["count"]})

    def current(self, task, model, source: str, meta: dict) -> Sample:
        pre: Preprocessor = task.preprocessor
        if pre.image_shape is not None:
            if not source.startswith("images:"):
                raise ProfileError(
                    f"--data={source}: the run's model reads images; give images:DIR"
                )
            directory = source.removeprefix("images:")
            if not os.path.isdir(directory):
                raise ProfileError(f"--data={source}: {directory} is not a directory of images")
            images, _, bad = image_folder.read_images(directory, pre.image_shape[0])
            features = {IMAGE: images}
        else:
            features, bad = _read_tables(pre, source)
        if not len(next(iter(features.values()))):
            raise ProfileError(
                f"--data={source} has no rows to compare ({bad['count']} skipped as bad)"
            )
        return _sample(pre, model, features, {"bad_rows": bad["count"]})


def _read_tables(pre: Preprocessor, source: str) -> tuple[dict, dict]:
    """The raw feature columns of every file `csv:GLOB` or `parquet:GLOB` names, pooled."""
    if not source.startswith(_TABLE_PREFIXES):
        raise ProfileError(
            f"--data={source}: the run's model reads a table; give csv:PATH or parquet:PATH"
        )
    pattern = source.partition(":")[2]
    paths = sorted(glob.glob(os.path.expanduser(pattern))) or [pattern]
    numeric, categorical = [c.name for c in pre.numeric], [c.name for c in pre.categorical]
    pooled: dict[str, list] = {}
    bad = {"count": 0}
    for path in paths:
        if not os.path.isfile(path):
            raise ProfileError(f"--data={source}: no such file {path}")
        try:
            columns, _, skipped = tables.read_features(
                path, numeric=numeric, categorical=categorical
            )
        except ValueError as err:
            raise ProfileError(f"--data={source}: {err}") from None
        bad["count"] += skipped["count"]
        for name, values in columns.items():
            pooled.setdefault(name, []).append(values)
    return {name: np.concatenate(parts) for name, parts in pooled.items()}, bad
