"""Distillation (task=distill): the loss against numpy (padding ignored), forward and reverse
KL, alpha=0 as the student's own task, a language model and a classifier distilled end to end
(the LM resumed exactly), and the config errors."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jtrain import config as config_lib
from jtrain import export, predict, pretrained, run, tasks
from jtrain.data.features import IMAGE
from jtrain.metrics import read_metrics
from jtrain.tasks.distill import DistillTask
from jtrain.tasks.lm import LMTask
from jtrain.validation import ConfigError
from tests.conftest import load_config, tiny_config, train_losses

V, B, L = 384, 2, 5  # the tiny model's vocabulary; a batch of 2 rows of 5 tokens


def _with_distill(config, **distill):
    config.distill = ml_collections.ConfigDict(
        {"teacher": "", "task": "lm", "alpha": 0.5, "temperature": 2.0, "kl": "forward", **distill}
    )
    return config


def _student_config(teacher: str, **distill):
    """The tiny recipe at half width, learning from `teacher`."""
    config = tiny_config(
        task="distill",
        train__steps=4,
        train__log_every=1,
        eval__every_steps=0,
        checkpoint__every_steps=2,
        model__d_model=32,
        model__head_dim=4,
        model__d_ff=64,
    )
    return _with_distill(config, teacher=teacher, **distill)


def _softmax_log(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_distill(student, teacher, targets, weight, alpha, temperature, kl):
    """The formula, directly: alpha T^2 KL + (1 - alpha) CE, summed over weighted positions."""
    real = weight > 0
    s, t, w = student[real].astype(np.float64), teacher[real].astype(np.float64), weight[real]
    log_s, log_t = _softmax_log(s / temperature), _softmax_log(t / temperature)
    p, q = (log_t, log_s) if kl == "forward" else (log_s, log_t)
    kl_each = (np.exp(p) * (p - q)).sum(-1)
    ce_each = -np.take_along_axis(_softmax_log(s), targets[real][:, None], -1)[:, 0]
    kl_sum, ce_sum = (w * kl_each).sum(), (w * ce_each).sum()
    return alpha * temperature**2 * kl_sum + (1 - alpha) * ce_sum, kl_sum, ce_sum, w.sum()


def _logits_batch(seed: int = 0):
    """Random logits and a batch whose second row ends in 2 padded positions."""
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(B, L, V)).astype(np.float32) * 3
    teacher = rng.normal(size=(B, L, V)).astype(np.float32) * 3
    weight = np.ones((B, L), np.float32)
    weight[1, 3:] = 0
    batch = {
        "inputs": jnp.zeros((B, L), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, 259, (B, L)), jnp.int32),
        "loss_weight": jnp.asarray(weight),
    }
    return student, teacher, batch


def _fixed(logits):
    """A stand-in model that returns these logits, whatever it reads."""
    return lambda *args, **kwargs: jnp.asarray(logits)


def _distill_loss(student, teacher, batch, **distill):
    task = DistillTask(_with_distill(tiny_config(task="distill"), **distill))
    frozen = {"teacher": _fixed(teacher)}
    return task, task.loss(_fixed(student), batch, dropout_rng=None, frozen=frozen)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_the_loss_is_the_formula_over_real_positions_only(kl):
    student, teacher, batch = _logits_batch()
    task, out = _distill_loss(student, teacher, batch, alpha=0.3, temperature=2.5, kl=kl)
    weight = np.asarray(batch["loss_weight"])
    targets = np.asarray(batch["targets"])
    total, kl_sum, ce_sum, w = _numpy_distill(student, teacher, targets, weight, 0.3, 2.5, kl)
    np.testing.assert_allclose(float(out.loss_sum), total, rtol=1e-5)
    np.testing.assert_allclose(float(out.sums["kl"]), kl_sum, rtol=1e-5)
    np.testing.assert_allclose(float(out.sums["ce"]), ce_sum, rtol=1e-5)
    assert float(out.weight) == w == 8
    metrics = task.report(out)
    np.testing.assert_allclose(metrics["loss"], total / w, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kl_sum / w, rtol=1e-5)
    np.testing.assert_allclose(metrics["perplexity"], np.exp(ce_sum / w), rtol=1e-5)
    # Garbage in the padded positions' logits changes nothing: huge in the student's (the
    # student task's own loss weighs its terms by 0), even inf or NaN in the teacher's.
    for student_garbage, teacher_garbage in ((1e30, -1e30), (-1e30, np.inf), (1e30, np.nan)):
        s, t = student.copy(), teacher.copy()
        s[1, 3:], t[1, 3:] = student_garbage, teacher_garbage
        _, padded = _distill_loss(s, t, batch, alpha=0.3, temperature=2.5, kl=kl)
        assert float(padded.loss_sum) == float(out.loss_sum)
        assert float(padded.sums["kl"]) == float(out.sums["kl"])


def test_forward_and_reverse_kl_differ_and_vanish_for_the_teachers_own_logits():
    student, teacher, batch = _logits_batch(1)
    _, forward = _distill_loss(student, teacher, batch, kl="forward")
    _, reverse = _distill_loss(student, teacher, batch, kl="reverse")
    assert abs(float(forward.sums["kl"]) - float(reverse.sums["kl"])) > 1e-2
    _, same = _distill_loss(teacher, teacher, batch, kl="reverse")
    assert abs(float(same.sums["kl"])) < 1e-4


def test_alpha_0_is_the_students_own_task_exactly():
    config = tiny_config()
    student = LMTask(config).make_model(nnx.Rngs(0))
    teacher = LMTask(config).make_model(nnx.Rngs(1))
    _, _, batch = _logits_batch()
    batch["inputs"] = jnp.asarray(np.arange(B * L).reshape(B, L) % 200, jnp.int32)
    rng = jax.random.key(3)
    own = LMTask(config).loss(student, batch, dropout_rng=rng, frozen={})
    task = DistillTask(_with_distill(tiny_config(task="distill"), alpha=0.0))
    out = task.loss(student, batch, dropout_rng=rng, frozen={"teacher": teacher})
    assert float(out.loss_sum) == float(own.loss_sum)
    assert float(out.sums["accuracy"]) == float(own.sums["accuracy"])
    assert float(out.sums["kl"]) > 0  # the teacher differs; alpha=0 ignores it
    assert task.report(out)["loss"] == LMTask(config).report(own)["loss"]


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lm_teacher"))
    config = tiny_config(train__steps=3, eval__every_steps=0, eval__steps=1)
    run.train_and_evaluate(config, workdir)
    return workdir


def test_a_language_model_distills_and_resumes_exactly(lm_teacher, tmp_path):
    config = _student_config(lm_teacher)
    straight = str(tmp_path / "straight")
    run.train_and_evaluate(config, straight)
    events = read_metrics(os.path.join(straight, "metrics.jsonl"))
    val = [e for e in events if e["split"] == "val"][-1]
    assert {"loss", "ce", "kl", "perplexity", "accuracy"} <= set(val)
    assert val["loss"] == pytest.approx(0.5 * 4 * val["kl"] + 0.5 * val["ce"], rel=1e-5)
    # Lose the last checkpoint: the resumed run loads the teacher again from its workdir and
    # reproduces every loss of the uninterrupted one.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    run.train_and_evaluate(_student_config(lm_teacher), resumed)
    assert train_losses(resumed) == train_losses(straight)
    assert os.path.isfile(os.path.join(resumed, "frozen_sources.json"))  # the teacher, pinned


def _digits(**overrides):
    """A small digits CNN trained for a few steps, without epochs or early stopping."""
    settings = {
        "train__epochs": 0,
        "train__steps": 12,
        "train__log_every": 4,
        "train__early_stopping__metric": "",
        "eval__every_steps": 0,
        "checkpoint__every_steps": 0,
        "model__stages": 2,
        "model__blocks": 1,
        "optimizer__lr": 1e-2,
    }
    return load_config("digits_cnn.py", **{**settings, **overrides})


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("digits_teacher"))
    run.train_and_evaluate(_digits(model__channels=8), workdir)
    return workdir


def test_a_classifier_distills_end_to_end(digits_teacher, tmp_path):
    config = _digits(task="distill", model__channels=4, train__steps=16)
    _with_distill(config, teacher=digits_teacher, task="classify", temperature=4.0)
    result = run.train_and_evaluate(config, str(tmp_path / "student"))
    test = result["test"]
    assert {"loss", "ce", "kl", "accuracy", "log_loss"} <= set(test)
    assert test["loss"] == pytest.approx(0.5 * 16 * test["kl"] + 0.5 * test["ce"], rel=1e-5)
    train = [e for e in read_metrics(str(tmp_path / "student" / "metrics.jsonl")) if "kl" in e]
    assert train[-1]["kl"] < train[0]["kl"]  # the student moves towards its teacher
    # The student is its own task's model afterwards: jtrain.predict takes the run.
    student = predict.Predictor.load(str(tmp_path / "student"))
    pre = student.preprocessor
    assert pre.image_shape == predict.load_preprocessor(digits_teacher).image_shape
    images = np.random.default_rng(0).integers(0, 16, (3, *pre.image_shape)).astype(np.float32)
    probabilities = student(pre.transform_features({IMAGE: images}))
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "distill, match",
    [
        ({"teacher": ""}, r"distill.teacher='' is invalid: name the teacher"),
        ({"teacher": "/no/such/run"}, r"distill.teacher='/no/such/run' is invalid: no such"),
        ({"alpha": 1.5}, r"distill.alpha=1.5 is invalid: must be in \[0, 1\]"),
        ({"temperature": 0.0}, r"distill.temperature=0.0 is invalid: must be > 0"),
        ({"kl": "sideways"}, r"distill.kl='sideways' is invalid: allowed: forward, reverse"),
        ({"task": "regress"}, r"distill.task='regress' is invalid: allowed: lm, sft, classify"),
    ],
)
def test_bad_settings_name_the_key(lm_teacher, distill, match):
    config = _student_config(lm_teacher)
    config.distill.update(distill)
    with pytest.raises(ConfigError, match=match):
        config_lib.validate(config)


def test_a_teacher_of_another_vocabulary_is_refused_with_both_sizes(lm_teacher):
    config = _student_config(lm_teacher)
    config.model.vocab_size = 512
    with pytest.raises(ConfigError, match=r"teacher's vocabulary has 384 ids .* student's 512"):
        config_lib.validate(config)


def test_a_teacher_of_other_classes_is_refused_with_both_counts(digits_teacher):
    config = _digits(task="distill", data__source="sklearn:wine", model__kind="mlp")
    config.model = ml_collections.ConfigDict({"kind": "mlp", "width": 16, "init_from": ""})
    _with_distill(config, teacher=digits_teacher, task="classify")
    with pytest.raises(ConfigError, match=r"the teacher has 10 classes .* student's data 3"):
        config_lib.validate(config)


def test_the_teacher_is_a_frozen_model_of_its_own_architecture(lm_teacher):
    task = tasks.get(_student_config(lm_teacher))
    [(name, frozen)] = task.frozen_models().items()
    assert (name, frozen.init_from) == ("teacher", lm_teacher)
    teacher = nnx.eval_shape(lambda: frozen.make(nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: task.make_model(nnx.Rngs(0)))
    assert teacher.cfg.d_model == 64 and student.cfg.d_model == 32


def test_an_hf_teacher_is_its_runs_model(lm_teacher, tmp_path):
    hf_dir = str(tmp_path / "hf")
    export.export_hf(lm_teacher, hf_dir)  # the same weights as a Hugging Face directory
    makers = {
        spec: tasks.get(_student_config(spec)).frozen_models()["teacher"]
        for spec in (lm_teacher, f"hf:{hf_dir}")
    }
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    weights = []
    for spec, frozen in makers.items():
        params = nnx.state(nnx.eval_shape(lambda f=frozen: f.make(nnx.Rngs(0))), nnx.Param)
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), params
        )
        weights.append(jax.tree.leaves(pretrained.load(spec, abstract)))
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)
