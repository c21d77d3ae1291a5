"""The Preprocessor: from a RawSplit's columns or images to the arrays a model reads.

Statistics are fitted on the train split only and kept (`to_json`) so the same transform
applies at prediction time. Numeric columns are standardised ((x - mean) / std, a std of 0
read as 1); a missing value becomes 0 (the mean) and, for each column that had a missing
value in train, a 0/1 indicator column follows the numeric columns. Categorical columns become
ids 1..n into the train values sorted; 0 is a value unseen in train or missing. Images pass
as they are. Targets: class ids into `classes` (classify), or values standardised by the
train mean and std (regress). Output keys follow `jtrain.models.inputs`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jtrain.data.supervised import RawSplit
from jtrain.models.inputs import InputSpec

OBJECTIVES = ("classify", "regress")
IMAGE = "image"
_QUOTED = 5  # unseen labels named in a report


@dataclasses.dataclass(frozen=True)
class NumericColumn:
    """A numeric column's train statistics."""

    name: str
    mean: float
    std: float  # 1.0 where train's was 0
    indicator: bool  # train had a missing value: a 0/1 "missing" column is added


@dataclasses.dataclass(frozen=True)
class CategoricalColumn:
    """A categorical column's train values, sorted; value i has id i + 1."""

    name: str
    vocabulary: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """Fitted feature and target transforms (build with `fit` or `from_json`)."""

    objective: str
    numeric: tuple[NumericColumn, ...] = ()
    categorical: tuple[CategoricalColumn, ...] = ()
    image_shape: tuple[int, int, int] | None = None
    classes: tuple[str, ...] = ()  # classify: class names in label-id order
    target_mean: float = 0.0  # regress
    target_std: float = 1.0  # regress

    @classmethod
    def fit(cls, train: RawSplit, *, objective: str) -> Preprocessor:
        """Fits the statistics of `train` (the train split only) for `objective`."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}.")
        if not len(train):
            raise ValueError("The train split is empty: nothing to fit the preprocessing on.")
        numeric, categorical, image_shape = [], [], None
        for name, column in train.features.items():
            if name == IMAGE and column.ndim == 4:
                image_shape = tuple(int(n) for n in column.shape[1:])
            elif column.ndim != 1:
                raise ValueError(f"feature {name!r} has shape {column.shape}; expected [N].")
            elif not np.issubdtype(column.dtype, np.number):  # text (object), str or bool
                categorical.append(_fit_categorical(name, column))
            else:
                numeric.append(_fit_numeric(name, column))
        if objective == "classify":
            target = {"classes": _fit_classes(train)}
        else:
            y = _numeric_target(train.target)
            target = {"target_mean": float(np.mean(y)), "target_std": _std(np.std(y))}
        return cls(objective, tuple(numeric), tuple(categorical), image_shape, **target)

    def transform(self, split: RawSplit) -> tuple[dict[str, np.ndarray], dict]:
        """The arrays of `split` with "label" or "target", and a report of the rows.

        The report: {"rows": kept, "dropped": rows of labels unseen in train, "unseen_labels":
        the first few, "message": "" or what was dropped and why, "bad": split.bad}.
        """
        arrays = self.transform_features(split.features)
        if self.objective == "regress":
            y = (_numeric_target(split.target) - self.target_mean) / self.target_std
            arrays["target"] = y.astype(np.float32)
            return arrays, _report(len(split), split.bad, [], 0)
        index = {name: i for i, name in enumerate(self.classes)}
        names = _label_names(split)
        labels = np.array([index.get(name, -1) for name in names], dtype=np.int32)
        keep = labels >= 0
        if not keep.all():
            arrays = {key: array[keep] for key, array in arrays.items()}
        arrays["label"] = labels[keep]
        unseen = sorted({name for name in names if name not in index})
        return arrays, _report(int(keep.sum()), split.bad, unseen, int((~keep).sum()))

    def transform_features(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's input arrays from raw feature columns (or images); no target."""
        wanted = [c.name for c in self.numeric] + [c.name for c in self.categorical]
        wanted += [IMAGE] if self.image_shape else []
        missing = [name for name in wanted if name not in features]
        if missing:
            raise ValueError(
                f"feature column {missing[0]!r} is missing; the preprocessing was fitted on "
                f"{wanted} (missing: {missing})."
            )
        out = {}
        if self.numeric:
            out["numeric"] = _numeric(self.numeric, features)
        if self.categorical:
            out["categorical"] = _categorical(self.categorical, features)
        if self.image_shape:
            out["image"] = _image(features[IMAGE], self.image_shape)
        sizes = {key: len(array) for key, array in out.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"feature columns differ in length: {sizes}.")
        return out

    def input_spec(self) -> InputSpec:
        """What a model built for this data reads."""
        return InputSpec(
            numeric=len(self.numeric) + sum(c.indicator for c in self.numeric),
            categories=tuple(len(c.vocabulary) + 1 for c in self.categorical),
            image_shape=self.image_shape,
        )

    def target_to_original(self, values: np.ndarray) -> np.ndarray:
        """Regress: standardised predictions back in the target's own units (float64)."""
        if self.objective != "regress":
            raise ValueError("target_to_original applies to objective 'regress' only.")
        return np.asarray(values, dtype=np.float64) * self.target_std + self.target_mean

    def to_json(self) -> dict:
        """Everything needed to apply the transform later, as JSON-serialisable values."""
        return _lists(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, values: dict) -> Preprocessor:
        """The Preprocessor `to_json` described."""
        shape = values.get("image_shape")
        return cls(
            objective=values["objective"],
            numeric=tuple(NumericColumn(**c) for c in values.get("numeric", ())),
            categorical=tuple(
                CategoricalColumn(c["name"], tuple(c["vocabulary"]))
                for c in values.get("categorical", ())
            ),
            image_shape=tuple(int(n) for n in shape) if shape else None,
            classes=tuple(values.get("classes", ())),
            target_mean=float(values.get("target_mean", 0.0)),
            target_std=float(values.get("target_std", 1.0)),
        )


def _lists(value):
    """`value` with every tuple a list, for JSON."""
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_lists(item) for item in value]
    return value


# Fitting.


def _std(value) -> float:
    value = float(value)
    return value if np.isfinite(value) and value > 0 else 1.0


def _fit_numeric(name: str, column: np.ndarray) -> NumericColumn:
    x = np.asarray(column, dtype=np.float64)
    missing = np.isnan(x)
    if missing.all():
        return NumericColumn(name, 0.0, 1.0, True)
    return NumericColumn(name, float(np.nanmean(x)), _std(np.nanstd(x)), bool(missing.any()))


def _fit_categorical(name: str, column: np.ndarray) -> CategoricalColumn:
    values = {_category(value) for value in column}
    return CategoricalColumn(name, tuple(sorted(values - {None})))


def _fit_classes(train: RawSplit) -> tuple[str, ...]:
    if train.class_names is not None:
        return tuple(train.class_names)
    return tuple(sorted(set(_label_names(train)), key=_label_order))


def _label_order(name: str) -> tuple:
    """Numbers in numeric order ("2" before "10"), then text."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def _numeric_target(target: np.ndarray) -> np.ndarray:
    if target.dtype == object or not np.issubdtype(target.dtype, np.number):
        example = next((v for v in target), None)
        raise ValueError(
            f"objective 'regress' needs a numeric target, but it holds labels such as "
            f"{example!r}; use objective 'classify' or another data.target."
        )
    return np.asarray(target, dtype=np.float64)


# Applying.


def _label_names(split: RawSplit) -> list[str]:
    """Each row's class as text: the dataset's own name of an int label, else the label."""
    if split.class_names is not None:
        return [split.class_names[int(i)] for i in split.target]
    return [_label_name(value) for value in split.target]


def _label_name(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))  # a label column read as numbers: 1.0 is class "1"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return str(value)


def _category(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


def _report(rows: int, bad: dict, unseen: list[str], dropped: int) -> dict:
    """transform's report: rows kept, the loader's bad rows, rows of unseen labels dropped."""
    message = ""
    if dropped:
        shown = ", ".join(repr(name) for name in unseen[:_QUOTED])
        more = ", ..." if len(unseen) > _QUOTED else ""
        message = (
            f"dropped {dropped} rows whose label is not a class of the train split ({shown}"
            f"{more}); add train examples of those classes or remove the rows"
        )
    return {
        "rows": rows,
        "dropped": dropped,
        "unseen_labels": unseen[:_QUOTED],
        "message": message,
        "bad": bad,
    }


def _numeric(columns: tuple[NumericColumn, ...], features: dict) -> np.ndarray:
    standardised, indicators = [], []
    for column in columns:
        x = _floats(column.name, features[column.name])
        missing = np.isnan(x)
        standardised.append(np.where(missing, 0.0, (x - column.mean) / column.std))
        if column.indicator:
            indicators.append(missing.astype(np.float64))
    return np.stack(standardised + indicators, axis=1).astype(np.float32)


def _floats(name: str, column) -> np.ndarray:
    try:
        x = np.asarray(column, dtype=np.float64)  # None reads as NaN
    except (TypeError, ValueError) as err:
        raise ValueError(f"numeric feature column {name!r} holds a non-number ({err}).") from err
    if x.ndim != 1:
        raise ValueError(f"feature column {name!r} has shape {x.shape}; expected [N].")
    return np.where(np.isinf(x), np.nan, x)


def _categorical(columns: tuple[CategoricalColumn, ...], features: dict) -> np.ndarray:
    ids = []
    for column in columns:
        index = {value: i + 1 for i, value in enumerate(column.vocabulary)}
        values = features[column.name]
        ids.append(np.fromiter((index.get(_category(v), 0) for v in values), np.int32, len(values)))
    return np.stack(ids, axis=1)


def _image(images, shape: tuple[int, int, int]) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.shape[1:] != shape:
        raise ValueError(f"images have shape {images.shape[1:]}; the model reads {shape}.")
    return images
