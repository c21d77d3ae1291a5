"""Classification and regression through the loop: epochs, early stopping that restores the best
weights, a test split touched once, exact metrics equal to scikit-learn's on the model's own
predictions, sharded and micro-batched steps equal to one device, exact resume with
augmentation, and clear errors for bad settings."""

import itertools
import json
import shutil

import jax
import numpy as np
import pytest

from jtrain import run, runs
from jtrain.data import pipeline
from jtrain.data.augment import ImageAugment
from jtrain.experiment import Experiment
from jtrain.metrics import read_metrics
from jtrain.tasks import mixing
from jtrain.tasks.supervised import model_inputs
from jtrain.validation import ConfigError
from tests.conftest import load_config, train_losses

TINY_MLP = {"width": 16, "depth": 1, "dropout": 0.0, "embed_dim": 4}
TINY_CNN = {"kind": "cnn", "channels": 8, "stages": 2, "blocks": 1, "dropout": 0.0}


def _config(recipe: str, **overrides):
    """A recipe logging every 4 steps, with `section__name=value` overrides."""
    return load_config(recipe, **{"train__log_every": 4, **overrides})


def _events(workdir, split):
    return [e for e in read_metrics(str(workdir)) if e["split"] == split]


@pytest.fixture(scope="module")
def iris_run(tmp_path_factory):
    """Iris with a tiny MLP; min_delta so large that no evaluation counts as an improvement,
    so the run stops after 1 + patience epochs, on the first epoch's weights."""
    workdir = tmp_path_factory.mktemp("iris") / "run"
    config = _config(
        "tabular_classify.py",
        data__source="sklearn:iris",
        train__epochs=10,
        train__batch_size=16,
        train__early_stopping__metric="loss",
        train__early_stopping__mode="min",
        train__early_stopping__patience=2,
        train__early_stopping__min_delta=100.0,
        **{f"model__{k}": v for k, v in TINY_MLP.items()},
    )
    results = run.train_and_evaluate(config, str(workdir))
    return workdir, config, results


def test_epochs_set_the_steps_and_validate_every_epoch(iris_run):
    workdir, config, _ = iris_run
    per_epoch = -(-91 // 16)  # iris's hashed train split has 91 rows
    assert config.train.steps == 10 * per_epoch and config.eval.every_steps == per_epoch
    assert [e["step"] for e in _events(workdir, "val")] == [per_epoch * k for k in (1, 2, 3)]


def test_early_stopping_restores_the_best_and_tests_it_once(iris_run):
    workdir, config, results = iris_run
    per_epoch = config.eval.every_steps
    record = json.loads((workdir / "early_stopping.json").read_text())
    assert record["stopped"] and record["stopped_at"] == 3 * per_epoch
    history = {int(k): v for k, v in record["history"].items()}
    assert record["best_step"] == min(history, key=lambda s: (history[s], s))
    assert 3 * per_epoch in {e["step"] for e in _events(workdir, "train") if "loss" in e}
    [test] = _events(workdir, "test")
    assert test["step"] == record["best_step"] and results["test"]["loss"] == test["loss"]
    for name in ("val_confusion_matrix", "test_confusion_matrix"):
        matrix = json.loads((workdir / "eval" / f"{name}.json").read_text())
        assert matrix["classes"] == ["setosa", "versicolor", "virginica"]
        assert (workdir / "eval" / f"{name}.png").stat().st_size > 0
    assert json.loads((workdir / "preprocessing.json").read_text())["classes"]

    # Started again: stays stopped, and the test split is not evaluated a second time.
    again = run.train_and_evaluate(config, str(workdir))
    assert len(_events(workdir, "test")) == 1 and again["test"]["loss"] == test["loss"]
    config.eval.split = "test"
    assert run.evaluate(config, str(workdir))["loss"] == test["loss"]
    assert len(_events(workdir, "test")) == 1


def test_val_metrics_equal_sklearn_on_the_models_own_predictions(iris_run):
    metrics_ = pytest.importorskip("sklearn.metrics")
    workdir, config, _ = iris_run
    best = json.loads((workdir / "early_stopping.json").read_text())["best_step"]
    val = [e for e in _events(workdir, "val") if e["step"] == best][-1]
    task = runs.run_task(str(workdir))
    examples = task.examples(None, "val").features
    model = runs.trained_model(str(workdir))  # the final (best) weights
    probs = np.asarray(jax.nn.softmax(model(model_inputs(examples))), np.float64)
    probs /= probs.sum(axis=1, keepdims=True)  # as the task does: float32 rows sum to 1 +- 1e-7
    labels = examples["label"]
    assert val["accuracy"] == pytest.approx(
        metrics_.accuracy_score(labels, probs.argmax(1)), abs=1e-9
    )
    expected = {
        "f1_macro": metrics_.f1_score(labels, probs.argmax(1), average="macro"),
        "roc_auc": metrics_.roc_auc_score(labels, probs, multi_class="ovr"),
        "log_loss": metrics_.log_loss(labels, probs, labels=[0, 1, 2]),
    }
    for name, value in expected.items():
        assert val[name] == pytest.approx(value, abs=1e-6), name


def test_regression_reports_sklearn_metrics_in_the_targets_units(tmp_path):
    metrics_ = pytest.importorskip("sklearn.metrics")
    config = _config(
        "tabular_regress.py",
        train__epochs=2,
        train__early_stopping__metric="",
        **{f"model__{k}": v for k, v in TINY_MLP.items()},
    )
    results = run.train_and_evaluate(config, str(tmp_path))
    task = runs.run_task(str(tmp_path))
    examples = task.examples(None, "test").features
    model = runs.trained_model(str(tmp_path))
    predicted = task.preprocessor.target_to_original(
        np.asarray(model(model_inputs(examples))[:, 0], np.float64)
    )
    target = task.preprocessor.target_to_original(examples["target"].astype(np.float64))
    assert results["test"]["r2"] == pytest.approx(metrics_.r2_score(target, predicted), abs=1e-5)
    assert results["test"]["mae"] == pytest.approx(
        metrics_.mean_absolute_error(target, predicted), rel=1e-5
    )
    assert 25 < np.mean(target) < 346  # the diabetes target's own range, not standardised


def _cnn_config(**overrides):
    settings = {
        "train__epochs": 0,
        "train__early_stopping__metric": "",
        "eval__every_steps": 0,
        "eval__steps": 1,
        "checkpoint__every_steps": 0,
        "train__log_every": 1,
        **{f"model__{k}": v for k, v in TINY_CNN.items()},
    }
    return _config("digits_cnn.py", **{**settings, **overrides})


def _step_losses(config, devices, batches) -> list[float]:
    exp = Experiment.from_config(config, devices)
    state, losses = exp.init_state(), []
    for batch in batches:
        state, step_metrics = exp.train_step(state, exp.global_batch(batch))
        losses.append(float(step_metrics["loss"]))
    return losses


def test_sharded_and_microbatched_steps_equal_one_device():
    # Mixup pairs examples within what one loss call sees, so it is off here; the host
    # augmentation (crops) is on. Dropout masks depend on the micro-batch: off too.
    config = _cnn_config(augment__mixup_alpha=0.0, augment__crop_padding=1)
    batches = list(itertools.islice(pipeline.make_train_iterator(config), 2))
    one = _step_losses(config, jax.devices()[:1], batches)
    variants = {
        "data=2 x fsdp=2 x tensor=2": {"mesh__data": 2, "mesh__fsdp": 2, "mesh__tensor": 2},
        "4 micro-batches": {"train__microbatches": 4},
    }
    for name, overrides in variants.items():
        devices = jax.devices()[: 8 if "mesh__data" in overrides else 1]
        other = _step_losses(_cnn_config(augment__mixup_alpha=0.0, **overrides), devices, batches)
        np.testing.assert_allclose(other, one, rtol=1e-6, err_msg=name)


def test_a_resumed_run_augments_and_mixes_exactly_as_the_uninterrupted_one(tmp_path):
    # An MLP on the flattened digits: the crops and mixup are the point, not the CNN.
    def config():
        return _cnn_config(
            train__steps=6,
            checkpoint__every_steps=3,
            mesh__data=-1,
            model__kind="mlp",
            model__norm="layer",
        )

    run.train_and_evaluate(config(), str(tmp_path / "straight"))
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    run.train_and_evaluate(config(), str(tmp_path / "resumed"))
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")


def test_image_augmentation_is_a_function_of_the_seed_and_the_row():
    augment = ImageAugment(crop_padding=2, flip=True, color_jitter=0.3)
    image = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    first = augment({"image": image}, np.random.default_rng(7))["image"]
    again = augment({"image": image}, np.random.default_rng(7))["image"]
    assert first.shape == image.shape and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)
    assert 0.0 <= first.min() and first.max() <= 1.0


def test_mixing_keeps_target_rows_distributions():
    images = jax.random.uniform(jax.random.key(0), (8, 6, 6, 1))
    targets = jax.nn.one_hot(np.arange(8) % 3, 3)
    for alphas in ((0.4, 0.0), (0.2, 1.0)):
        mixed, soft = mixing.mix(
            jax.random.key(1), images, targets, mixup_alpha=alphas[0], cutmix_alpha=alphas[1]
        )
        assert mixed.shape == images.shape
        np.testing.assert_allclose(np.asarray(soft).sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"model__kind": "transformer"}, "model.kind"),
        ({"classify__class_weights": "1,2,3"}, "classify.class_weights"),
        ({"augment__crop_padding": 2}, "augment.crop_padding"),
        ({"train__epochs": -1}, "train.epochs"),
        ({"train__early_stopping__mode": "up"}, "train.early_stopping.mode"),
        ({"data__source": "sklearn:mnist"}, "data.source"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, overrides, key):
    config = _config("tabular_classify.py", **{"train__epochs": 1, **overrides})
    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        run.train_and_evaluate(config, str(tmp_path))


def test_an_early_stopping_metric_the_task_lacks_lists_the_allowed(tmp_path):
    config = _config(
        "tabular_classify.py",
        data__source="sklearn:iris",
        train__epochs=1,
        train__early_stopping__metric="r2",
        **{f"model__{k}": v for k, v in TINY_MLP.items()},
    )
    with pytest.raises(ConfigError, match="allowed: .*accuracy"):
        run.train_and_evaluate(config, str(tmp_path))
