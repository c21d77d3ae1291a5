"""End to end through the command line: a tiny run trains, evaluates and writes the workdir;
bad configs fail at once with messages that say what to do."""

import json
import os

import pytest

from jtrain import config as config_lib
from jtrain.metrics import read_metrics
from tests.conftest import run_main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = run_main(
        workdir,
        "--config=configs/tiny.py",
        "--config.train.steps=40",
        "--config.eval.every_steps=20",
        "--config.optimizer.lr=1e-2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout


def test_loss_falls_on_the_embedded_corpus(tiny_run):
    workdir, _ = tiny_run
    events = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    train = [e for e in events if e["split"] == "train" and "loss" in e]
    val = [e for e in events if e["split"] == "val"]
    assert [e["step"] for e in train] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [e["step"] for e in val] == [20, 40]
    # A uniform guess over 384 ids costs ln(384) = 5.95 nats; byte bigrams alone reach ~2.5.
    assert train[0]["loss"] > 4.0
    assert train[-1]["loss"] < 3.2
    assert val[-1]["loss"] < val[0]["loss"] < 3.5


def test_workdir_holds_config_metrics_and_tensorboard(tiny_run):
    workdir, stdout = tiny_run
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["train"]["steps"] == 40 and saved["optimizer"]["lr"] == 1e-2
    events = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    test = [e for e in events if e["split"] == "test"]
    assert len(test) == 1 and test[0]["step"] == 40  # the test split is touched once
    assert {"perplexity", "accuracy"} <= set(test[0])
    last = [e for e in events if e["split"] == "train" and "loss" in e][-1]
    assert {"lr", "grad_norm", "tokens_per_s", "step_time", "mfu"} <= set(last)
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert "sample (temperature 0.7):" in stdout


def test_bad_value_fails_before_compiling_and_says_what_is_allowed(tmp_path):
    result = run_main(tmp_path, "--config=configs/tiny.py", "--config.optimizer.name=adamz")
    assert result.returncode != 0
    assert "config.optimizer.name='adamz' is invalid: allowed: adamw, adafactor" in result.stderr
    assert "compile_time" not in result.stdout


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.n_kv_heads", 3, "must divide model.n_heads=8"),
        ("train.microbatches", 3, "must divide train.batch_size=16"),
        ("schedule.warmup_steps", -1, "must be >= 0"),
        ("model.kind", "lstm", "allowed: transformer"),
        (
            "task",
            "ppo",
            "allowed: classify, distill, dpo, grpo, lm, regress, reward, sft, or "
            "module.path:ClassName",
        ),
        ("task", "no_such_module:MyTask", "cannot import 'no_such_module'"),
        ("eval.split", "train", "allowed: val, test"),
        ("model.dtype", "float16", "allowed: float32, bfloat16"),
        ("model.vocab_size", 100, "at least the tokenizer's vocabulary size (259)"),
        ("mesh.rules.embed", "fsdb", "unknown mesh axes ['fsdb']"),
        ("mesh.data", 0, "must be positive or -1"),
    ],
)
def test_validate_names_key_value_and_what_is_allowed(key, value, message):
    config = config_lib.load("configs/tiny.py")
    section, _, name = key.rpartition(".")
    node = config
    for part in filter(None, section.split(".")):
        node = node[part]
    node[name] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.{key}") as err:
        config_lib.validate(config)
    assert message in str(err.value)


def test_a_short_run_needs_no_other_override(capsys):
    # The default warms up over 50 steps; a 20-step run must still validate, with a note.
    config = config_lib.load("configs/default.py")
    config.train.steps = 20
    config_lib.validate(config)
    assert "warming up over 2 steps" in capsys.readouterr().out
