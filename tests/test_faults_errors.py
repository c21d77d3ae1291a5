"""Faults a user causes by mistake: every one ends in one `error:` line that says what to do
(issue 11's buried messages), and what a resumed or skipping run leaves in its log."""

import math
import os
import shutil
import subprocess
import sys

import pytest

from jtrain import config as config_lib
from jtrain import errors, mesh, run
from jtrain.metrics import read_metrics
from jtrain.validation import ConfigError
from tests import faults
from tests.conftest import REPO, tiny_config


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--config=configs/tiny.py", "--config.train.stepz=5"],
            "error: a --config override names no config key 'stepz'; did you mean 'steps'?",
        ),
        (
            ["--config=configs/tinny.py"],
            "error: --config=configs/tinny.py: no such config file",
        ),
    ],
)
def test_command_line_mistakes_end_in_one_error_line(tmp_path, flags, message):
    assert faults.run_failing(tmp_path, *flags).startswith(message)
    assert not os.listdir(tmp_path)  # nothing written for a run that never started


def test_help_into_a_closed_pipe_is_not_an_error():
    """`jtrain-train --helpshort | head`: the reader leaves before the help is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jtrain.main", "--helpshort"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # before jax is even imported: every write of the help fails
    assert proc.stderr.read() == ""
    proc.wait(timeout=60)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_a_non_finite_setting_is_refused_before_anything_runs(value):
    config = config_lib.load("configs/tiny.py")
    config.optimizer.lr = value
    with pytest.raises(ConfigError, match="config.optimizer.lr=.* must be a finite number"):
        config_lib.validate(config)


def test_a_mesh_larger_than_the_devices_is_a_config_error():
    settings = tiny_config().mesh
    settings.data = 16
    with pytest.raises(ConfigError, match="needs 16 devices but 8 are available"):
        mesh.mesh_shape(settings, 8)
    assert issubclass(ConfigError, errors.UserError)


def test_user_fixable_os_errors_name_the_path_and_the_remedy():
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/a/config.json")
    assert errors.describe_os_error(full) == (
        "no space left on device at /runs/a/config.json: free space there or use another --workdir"
    )
    assert errors.describe_os_error(OSError(errno.EIO, "I/O error")) is None


def test_steps_redone_after_a_resume_follow_a_resume_marker(tmp_path):
    # A run that logged step 4 but died before saving it resumes at 2 and logs 3-4 again.
    config = tiny_config(train__steps=4, train__log_every=1, checkpoint__every_steps=2)
    config.eval.every_steps = 0
    workdir = str(tmp_path)
    run.train_and_evaluate(config, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    run.train_and_evaluate(config, workdir)
    events = read_metrics(workdir)
    marker = [e for e in events if e["split"] == "resume"]
    assert marker == [{"step": 2, "split": "resume", "redone_steps": 2}]
    after = events[events.index(marker[0]) + 1 :]
    assert sorted({e["step"] for e in after if e["split"] == "train" and "loss" in e}) == [3, 4]
