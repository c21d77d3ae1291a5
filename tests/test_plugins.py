"""The plug-in shape: a user's own task and records through the CLI, --mode=eval, the task
registry, and that nothing outside jtrain/tasks/ branches on which task runs."""

import pathlib
import re
import shutil
import time

import numpy as np
import pytest

from jtrain import checkpoint, hooks, metrics, tasks
from jtrain import config as config_lib
from jtrain.experiment import Experiment
from jtrain.loop import Loop
from jtrain.metrics import read_metrics
from tests.conftest import REPO, run_main, tiny_config

REGRESSION = [
    "--config=configs/default.py",
    "--config.task=examples.regression:Regression",
    "--config.data.source=python:examples.regression:records",
    "--config.train.log_every=5",
    "--config.eval.every_steps=20",
    "--config.checkpoint.every_steps=20",
    "--config.optimizer.lr=1e-2",
]


def _events(workdir, split, key="loss"):
    """The last event of each step (a resumed run logs some steps twice)."""
    return {e["step"]: e for e in read_metrics(workdir) if e["split"] == split and key in e}


@pytest.fixture(scope="module")
def regression_runs(tmp_path_factory):
    """The example regression task for 60 steps; then a copy that lost its last checkpoint
    (as if killed after step 40) and ran the same command again, resuming at 40."""
    straight = tmp_path_factory.mktemp("regression") / "straight"
    result = run_main(straight, *REGRESSION, "--config.train.steps=60")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = straight.parent / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "60")
    result = run_main(resumed, *REGRESSION, "--config.train.steps=60")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 40" in result.stdout
    return straight, resumed


def test_a_users_task_and_records_train_through_the_cli(regression_runs):
    straight, _ = regression_runs
    val = _events(straight, "val")
    assert sorted(val) == [20, 40, 60]
    # Predicting the mean scores the variance of y (about 1.9); the MLP does far better.
    assert val[60]["loss"] < 0.5 * val[20]["loss"] and val[60]["loss"] < 0.5
    assert {"rmse", "abs_error", "loss_weight"} <= set(val[60])
    assert val[60]["loss_weight"] == 256  # every val example once, none of the padding
    train = _events(straight, "train")[60]
    assert {"examples_per_s", "mfu"} <= set(train) and "tokens_per_s" not in train


def test_a_users_task_resumes_exactly(regression_runs):
    straight, resumed = regression_runs
    for split in ("train", "val", "test"):
        a, b = _events(straight, split), _events(resumed, split)
        assert a.keys() == b.keys()
        for step in a:
            assert a[step]["loss"] == b[step]["loss"], (split, step)


def test_eval_mode_evaluates_a_checkpoint_without_training(regression_runs):
    straight, _ = regression_runs
    before = len(read_metrics(straight))
    result = run_main(straight, *REGRESSION, "--mode=eval")
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_metrics(straight)
    assert len(events) == before + 1
    assert events[-1] == _events(straight, "val")[60]  # the same metrics, bit for bit
    # The test split was evaluated at the end of training: never a second time.
    result = run_main(straight, *REGRESSION, "--mode=eval", "--config.eval.split=test")
    assert result.returncode == 0 and "already evaluated" in result.stdout
    assert len(read_metrics(straight)) == before + 1
    result = run_main(straight, *REGRESSION, "--mode=eval", "--step=40")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(straight)[-1] == _events(straight, "val")[40]


def test_eval_mode_evaluates_init_from_weights_when_the_workdir_has_none(regression_runs, tmp_path):
    straight, _ = regression_runs
    result = run_main(tmp_path, *REGRESSION, "--mode=eval", f"--config.model.init_from={straight}")
    assert result.returncode == 0, result.stderr[-3000:]
    [event] = read_metrics(tmp_path)
    trained = _events(straight, "val")[60]
    assert event == {**trained, "step": 0}  # the trained weights, at step 0 of this workdir


def test_eval_mode_with_nothing_to_evaluate_says_what_to_do(tmp_path):
    result = run_main(tmp_path, *REGRESSION, "--mode=eval")
    assert result.returncode != 0
    assert "nothing to evaluate" in result.stderr and "model.init_from" in result.stderr


def test_task_names_resolve_to_registered_and_user_classes():
    assert {"lm", "sft"} <= set(tasks.names())
    from examples.regression import Regression

    assert tasks.task_class("examples.regression:Regression") is Regression
    with pytest.raises(config_lib.ConfigError, match="has no Task subclass named 'Nope'"):
        tasks.task_class("examples.regression:Nope")


def test_nothing_outside_tasks_branches_on_the_task():
    # The step, loop, hooks, pipeline, checkpoints and models vary by registration: a branch
    # on a task's name or class outside jtrain/tasks/ would be a second home for its logic.
    pattern = re.compile(
        r"""(\.task\s*(==|!=|in\b)|task\s*==|["'](lm|sft)["']|isinstance\([^)]*Task\b)"""
    )
    package = pathlib.Path(REPO) / "jtrain"
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in package.rglob("*.py")
        if "tasks" not in path.relative_to(package).parts
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        # "#": a comment; "@": a registration keyed by a task's name (a drift profiler)
        if pattern.search(line) and not line.lstrip().startswith(("#", "@"))
    ]
    assert not offenders, "\n".join(offenders)


class _StepEcho:
    """A batch source that reads the state, as an RL rollout source does: it makes each batch
    from the step the state is about to take."""

    def __init__(self, exp):
        self.exp, self.seen = exp, []

    def next(self, state):
        step = int(state.step)
        self.seen.append(step)
        tokens = np.full((16, 32), 3 + step, np.int32)
        weight = np.ones((16, 32), np.float32)
        return self.exp.global_batch({"inputs": tokens, "targets": tokens, "loss_weight": weight})

    def get_state(self):
        return {"seen": len(self.seen)}

    def set_state(self, position):
        pass


def test_the_loop_takes_batches_from_a_source_that_reads_the_state(tmp_path):
    config = tiny_config(train__steps=4, eval__every_steps=0, checkpoint__every_steps=0)
    exp = Experiment.from_config(config)
    source = _StepEcho(exp)
    ckpts = checkpoint.Checkpoints(tmp_path, config.checkpoint)
    with metrics.MetricWriter(str(tmp_path)) as writer:
        train_log = hooks.TrainLog(every=1, last=config.train.steps)
        loop = Loop(config, exp, source, [train_log], writer, ckpts, time.perf_counter())
        state, preempted = loop.run(exp.init_state(), 0, _NeverPreempted())
    ckpts.close()
    assert source.seen == [0, 1, 2, 3] and int(state.step) == 4 and not preempted
    assert sorted(_events(tmp_path, "train")) == [1, 2, 3, 4]


class _NeverPreempted:
    def reached(self, step):
        return False
