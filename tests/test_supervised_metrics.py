"""Tests for jtrain.supervised_metrics: parity with sklearn.metrics, golden values, the heatmap."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from jtrain import supervised_metrics as sm

# A fixed case with tied probabilities and a probability of exactly 0 and 1 (log loss clips).
GOLDEN_PROBS = np.array(
    [
        [0.5, 0.3, 0.2],
        [0.2, 0.5, 0.3],
        [0.4, 0.4, 0.2],
        [0.1, 0.1, 0.8],
        [0.3, 0.3, 0.4],
        [0.6, 0.2, 0.2],
        [0.2, 0.2, 0.6],
        [0.25, 0.5, 0.25],
        [0.1, 0.6, 0.3],
        [0.4, 0.2, 0.4],
        [0.0, 0.5, 0.5],
        [1.0, 0.0, 0.0],
    ]
)
GOLDEN_LABELS = np.array([0, 1, 1, 2, 0, 0, 0, 2, 2, 0, 1, 0])
# Computed once with sklearn 1.9.1 (top2 on the class-reversed problem, see `_reference`).
GOLDEN = {
    "accuracy": 0.5833333333333334,
    "top2_accuracy": 0.9166666666666666,
    "precision_macro": 0.5444444444444444,
    "recall_macro": 0.5555555555555555,
    "f1_macro": 0.544011544011544,
    "precision_weighted": 0.6083333333333334,
    "recall_weighted": 0.5833333333333334,
    "f1_weighted": 0.5898268398268398,
    "roc_auc": 0.7839506172839507,
    "log_loss": 0.8374725052261841,
}
GOLDEN_CONFUSION = [[4, 0, 2], [1, 2, 0], [0, 2, 1]]


@pytest.fixture
def skm():
    return pytest.importorskip("sklearn.metrics")


def _random_case(seed, num_classes, num_examples=300, *, ties=True):
    """Random probabilities (ties from small integer counts) and labels."""
    rng = np.random.default_rng(seed)
    if not ties:
        return rng.dirichlet(np.ones(num_classes), num_examples), rng.integers(
            0, num_classes, num_examples
        )
    counts = rng.integers(0, 4, size=(num_examples, num_classes)).astype(np.float64)
    counts[counts.sum(axis=1) == 0, 0] = 1.0
    return counts / counts.sum(axis=1, keepdims=True), rng.integers(0, num_classes, num_examples)


def _reference(skm, probs, labels, top_k):
    """The metrics of `sm.classification` computed by sklearn.metrics."""
    num_classes = probs.shape[1]
    classes = list(range(num_classes))
    predicted = probs.argmax(axis=1)
    ref = {"accuracy": skm.accuracy_score(labels, predicted)}
    if 1 < top_k < num_classes:
        # sklearn breaks top-k ties towards the higher class index; reversing the class order
        # turns that into jtrain's lower-index rule.
        ref[f"top{top_k}_accuracy"] = skm.top_k_accuracy_score(
            num_classes - 1 - labels, probs[:, ::-1], k=top_k, labels=classes
        )
    for average in ("macro", "weighted"):
        scores = skm.precision_recall_fscore_support(
            labels, predicted, labels=classes, average=average, zero_division=0
        )
        for name, value in zip(("precision", "recall", "f1"), scores[:3], strict=True):
            ref[f"{name}_{average}"] = value
    present = np.unique(labels)
    if present.size < 2:
        ref["roc_auc"] = math.nan
    elif num_classes == 2:
        ref["roc_auc"] = skm.roc_auc_score(labels, probs[:, 1])
    elif present.size == num_classes:
        ref["roc_auc"] = skm.roc_auc_score(labels, probs, multi_class="ovr", labels=classes)
    else:  # sklearn has no multiclass value here; jtrain averages over the present classes.
        ref["roc_auc"] = np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present])
    ref["log_loss"] = skm.log_loss(labels, probs, labels=classes)
    return ref


def _assert_matches(got, expected, tolerance=1e-6):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=tolerance, atol=tolerance, err_msg=name)


def test_golden_classification():
    got = sm.classification(GOLDEN_PROBS, GOLDEN_LABELS, top_k=2)
    _assert_matches(got, GOLDEN, tolerance=1e-12)
    predicted = GOLDEN_PROBS.argmax(axis=1)
    assert sm.confusion_matrix(predicted, GOLDEN_LABELS, 3).tolist() == GOLDEN_CONFUSION


def test_golden_regression():
    got = sm.regression(np.array([1.5, 1.5, 3.5, 4.0, 7.0]), np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    expected = {"mse": 0.95, "rmse": 0.9746794344808963, "mae": 0.7, "r2": 0.525}
    _assert_matches(got, expected, tolerance=1e-12)


CASES = [(c, seed) for c in (2, 3, 10) for seed in (0, 1, 2)] + [(100, 0)]


@pytest.mark.parametrize(("num_classes", "seed"), CASES)
@pytest.mark.parametrize("variant", ["ties", "no_ties", "never_predicted", "absent_label"])
def test_classification_matches_sklearn(skm, num_classes, seed, variant):
    probs, labels = _random_case(
        seed, num_classes, 2000 if num_classes == 100 else 300, ties=variant != "no_ties"
    )
    missing = num_classes - 1
    if variant == "never_predicted":
        probs[:, missing] = 0.0  # Rows stay normalised after dividing by their new sums.
        probs[probs.sum(axis=1) == 0, 0] = 1.0
        probs /= probs.sum(axis=1, keepdims=True)
        assert missing not in probs.argmax(axis=1)
    if variant == "absent_label":
        labels[labels == missing] = 0
    got = sm.classification(probs, labels, top_k=5)
    _assert_matches(got, _reference(skm, probs, labels, top_k=5))
    predicted = probs.argmax(axis=1)
    expected = skm.confusion_matrix(labels, predicted, labels=list(range(num_classes)))
    matrix = sm.confusion_matrix(predicted, labels, num_classes)
    assert matrix.dtype == np.int64 and np.array_equal(matrix, expected)


def test_top_k_matches_sklearn_directly_without_ties(skm):
    probs, labels = _random_case(3, 10, ties=False)
    for k in (2, 3, 9):
        expected = skm.top_k_accuracy_score(labels, probs, k=k, labels=list(range(10)))
        assert sm.classification(probs, labels, top_k=k)[f"top{k}_accuracy"] == expected


def test_tie_rules_prefer_the_lower_class_index():
    probs = np.array([[0.3, 0.3, 0.3, 0.1]] * 3)
    got = sm.classification(probs, np.array([0, 1, 2]), top_k=2)
    assert got["accuracy"] == pytest.approx(1 / 3)  # argmax picks class 0.
    assert got["top2_accuracy"] == pytest.approx(2 / 3)  # Classes 0 and 1 fill the top 2.


def test_top_k_only_between_one_and_num_classes():
    probs, labels = _random_case(0, 5)
    assert "top5_accuracy" not in sm.classification(probs, labels, top_k=5)
    assert "top1_accuracy" not in sm.classification(probs, labels, top_k=1)
    assert "top4_accuracy" in sm.classification(probs, labels, top_k=4)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_roc_auc_is_nan_with_one_class_present(num_classes):
    probs, _ = _random_case(0, num_classes, 50)
    got = sm.classification(probs, np.ones(50, dtype=np.int64))
    assert math.isnan(got["roc_auc"]) and got["accuracy"] >= 0.0


def test_bad_inputs_raise():
    probs, labels = _random_case(0, 3, 10)
    with pytest.raises(ValueError, match="softmax"):
        sm.classification(np.log(probs + 1e-3), labels)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        sm.classification(probs, labels + 1)
    with pytest.raises(ValueError, match="rows"):
        sm.classification(probs, labels[:5])
    with pytest.raises(ValueError, match="integer"):
        sm.confusion_matrix(labels.astype(float), labels, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_matches_sklearn(skm, seed):
    rng = np.random.default_rng(seed)
    targets = rng.normal(size=500) * 3.0 + 1.0
    predictions = targets + rng.normal(size=500)
    expected = {
        "mse": skm.mean_squared_error(targets, predictions),
        "rmse": skm.root_mean_squared_error(targets, predictions),
        "mae": skm.mean_absolute_error(targets, predictions),
        "r2": skm.r2_score(targets, predictions),
    }
    _assert_matches(sm.regression(predictions, targets), expected)


def test_regression_constant_target_matches_sklearn_force_finite(skm):
    targets = np.full(20, 3.0)
    predictions = np.random.default_rng(0).normal(size=20)
    assert sm.regression(predictions, targets)["r2"] == skm.r2_score(targets, predictions) == 0.0
    assert sm.regression(targets, targets)["r2"] == skm.r2_score(targets, targets) == 1.0


@pytest.mark.parametrize("num_classes", [2, 3, 10, 100])
def test_save_confusion_matrix(tmp_path, num_classes):
    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes, 5000)
    predicted = np.where(rng.random(5000) < 0.7, labels, rng.integers(0, num_classes, 5000))
    matrix = sm.confusion_matrix(predicted, labels, num_classes)
    names = [
        f"class_{i}_with_a_rather_long_name" if i % 7 == 0 else str(i) for i in range(num_classes)
    ]
    stem = str(tmp_path / "eval" / "confusion")
    sm.save_confusion_matrix(matrix, names, stem)
    assert sorted(os.listdir(tmp_path / "eval")) == ["confusion.json", "confusion.png"]
    with open(stem + ".json") as f:
        assert json.load(f) == {"classes": names, "matrix": matrix.tolist()}
    with Image.open(stem + ".png") as image:
        image.load()
        assert image.format == "PNG" and image.mode == "RGB"
        assert 100 <= min(image.size) and max(image.size) <= 1400


def test_save_confusion_matrix_rejects_mismatched_names(tmp_path):
    with pytest.raises(ValueError, match="class_names"):
        sm.save_confusion_matrix(np.eye(3, dtype=np.int64), ["a", "b"], str(tmp_path / "c"))
