"""Checkpoint faults (issue 11, items 1, 9, 10, 11 and 12): a damaged latest checkpoint is
moved aside and the run completes; corrupted bytes are caught by checksums; a save that fails
(a file where the checkpoints go, a full disk) ends the run at once with one error line and
keeps the older checkpoints; export and init_from fall back past damage too.

Every damaged workdir is a copy of one small run trained once, in-process.
"""

import errno
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain import checkpoint, checkpoint_faults, export, run, runs
from jtrain.experiment import Experiment
from jtrain.state import TrainState
from tests import faults
from tests.conftest import tiny_config, train_losses

# 20 steps saved every 5, three kept: checkpoints 10, 15 and 20.
CONFIG = dict(checkpoint__every_steps=5, eval__every_steps=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trained"))
    run.train_and_evaluate(tiny_config(**CONFIG), workdir)
    return workdir


@pytest.fixture
def copy(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    return workdir


@pytest.fixture(scope="module")
def abstract():
    return Experiment.from_config(tiny_config()).abstract_sharded_state().checkpointed()


def _ckpts(workdir, **kwargs) -> checkpoint.Checkpoints:
    return checkpoint.Checkpoints(workdir, tiny_config().checkpoint, **kwargs)


def _aside(workdir) -> list[str]:
    directory = checkpoint_faults.damaged_directory(os.path.join(workdir, "checkpoints"))
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _note(workdir, step: int) -> str:
    directory = checkpoint_faults.damaged_directory(os.path.join(workdir, "checkpoints"))
    with open(os.path.join(directory, str(step), checkpoint_faults.NOTE)) as f:
        return f.read()


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_completes(trained, copy):
    # Item 1: it fell back to 15, retrained 16-20, then died saving 20 (the damaged 20/ was
    # still there), on every rerun.
    faults.truncate(faults.data_files(copy, 20)[0])
    run.train_and_evaluate(tiny_config(**CONFIG), copy)
    assert _aside(copy) == ["20"]
    assert "fell back to step 15" in _note(copy, 20)
    assert _ckpts(copy).steps() == [10, 15, 20]
    assert train_losses(copy)[20] == train_losses(trained)[20]  # the redone steps, exactly


def test_a_deleted_data_file_is_passed_over_read_only_and_moved_aside_when_training(copy, abstract):
    os.remove(faults.data_files(copy, 20)[0])
    assert _ckpts(copy, read_only=True).restore_latest(abstract)[2] == 15
    assert _aside(copy) == []  # evaluation and export never write to the workdir
    assert _ckpts(copy).restore_latest(abstract)[2] == 15
    assert _aside(copy) == ["20"] and _ckpts(copy).steps() == [10, 15]


def test_a_checkpoint_of_another_model_is_refused_not_moved(copy):
    other = Experiment.from_config(tiny_config(model__d_ff=256)).abstract_sharded_state()
    with pytest.raises(checkpoint.CheckpointError, match="does not match the model"):
        _ckpts(copy).restore_latest(other.checkpointed())
    assert _aside(copy) == [] and _ckpts(copy).steps() == [10, 15, 20]


def test_flipped_bits_fail_the_checksums_and_the_restore_falls_back(copy, abstract):
    # Item 11: the bits loaded silently, changing the losses or turning into NaN.
    faults.flip_bits(faults.data_files(copy, 20)[0])
    assert _ckpts(copy).restore_latest(abstract)[2] == 15
    assert _aside(copy) == ["20"]
    assert "checksum mismatch in " in _note(copy, 20)  # which groups: where the flips landed


def test_checkpoints_written_before_checksums_still_restore(copy, abstract):
    faults.strip_checksums(copy, 20)
    state, _, step = _ckpts(copy).restore_latest(abstract)
    assert step == 20 and int(state.step) == 20


def test_export_and_init_from_fall_back_past_a_damaged_checkpoint(copy, tmp_path, caplog):
    # Item 12: export printed a TensorStore traceback; init_from reads the same way.
    for path in faults.data_files(copy, 20):  # the parameters' among them
        faults.truncate(path)
    with caplog.at_level(logging.WARNING):
        export.export_hf(copy, str(tmp_path / "hf"))
    assert f"{copy}/checkpoints/20 is damaged" in caplog.text
    assert os.path.isfile(tmp_path / "hf" / "config.json") and _aside(copy) == []
    params = Experiment.from_config(tiny_config()).abstract_sharded_state().params
    newest_good = checkpoint.load_params(copy, params)
    for a, b in zip(
        jax.tree.leaves(newest_good),
        jax.tree.leaves(checkpoint.load_params(copy, params, step=15)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(checkpoint.CheckpointError) as missing:
        runs.trained_model(copy, step=7)
    assert "has no checkpoint of step 7; it has steps [10, 15, 20]" in str(missing.value)
    assert "model.init_from" not in str(missing.value)  # the user ran export, not init_from


def test_export_of_a_damaged_step_is_refused_with_one_error_line(copy, tmp_path):
    for path in faults.data_files(copy, 20):
        faults.truncate(path)
    flags = (f"--workdir={copy}", f"--to_hf={tmp_path / 'hf'}", "--step=20")
    line = faults.one_error_line(faults.run_module("jtrain.export", *flags))
    assert f"{copy}/checkpoints/20 is damaged" in line
    assert "choose another of its steps [10, 15, 20]" in line


def test_a_save_that_fails_ends_the_run_at_once_with_one_error_line(tmp_path):
    # Item 9: the error was raised, then the process waited forever on Orbax's threads.
    def ready() -> bool:  # step 10 committed, and its save long finished
        return os.path.isdir(faults.step_dir(tmp_path, 10)) and max(train_losses(tmp_path)) >= 13

    checkpoints = os.path.join(tmp_path, "checkpoints")
    proc = faults.fault_mid_run(
        tmp_path, *faults.ARGS, ready=ready, fault=lambda: faults.replace_with_file(checkpoints)
    )
    line = faults.one_error_line(proc)
    assert "could not save checkpoint step 20" in line
    assert "a part of the path is a file, not a directory" in line


def test_a_full_disk_is_named_and_the_older_checkpoints_are_kept(tmp_path, monkeypatch, caplog):
    # Item 10: some 500 lines of Orbax tracebacks and no message of jtrain's.
    config = tiny_config(checkpoint__keep=1).checkpoint  # saving step 2 would delete step 1
    ckpts = checkpoint.Checkpoints(tmp_path, config)

    def save(step: int) -> None:
        state = TrainState(  # a small state: no model to build
            params={"w": jnp.ones(64)},
            opt_state={},
            step=jnp.asarray(step, jnp.int32),
            rng=jax.random.key(0),
            skipped=jnp.asarray(0, jnp.int32),
        )
        ckpts.save(state, data_state={}, config={}, started=0.0)
        ckpts.wait()

    save(1)
    faults.failing_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(checkpoint.CheckpointError) as failed:
        save(2)
    message = str(failed.value)
    assert message.startswith(f"could not save checkpoint step 2 in {ckpts.directory}: ")
    assert "no space left on device at " in message and "free space there" in message
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    monkeypatch.undo()
    assert _ckpts(tmp_path).steps() == [1]  # the preservation policy deleted nothing


def test_tensorstore_os_errors_are_read_from_their_text():
    written = "/w/checkpoints/10.orbax-checkpoint-tmp/state/ocdbt.process_0/d/cace40"
    err = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "rest.float32/0" in OCDBT database at local file '
        f'"/w/checkpoints/10.orbax-checkpoint-tmp/state/ocdbt.process_0/": Failed writing: '
        f'"{written}": Failed to write 226932 bytes to file 6: No space left on device '
        "[os_error_code='28']"
    )
    wrapped = RuntimeError("Save Finalize thread failed")
    wrapped.__cause__ = err
    remedy = "free space there or use another --workdir"
    assert checkpoint_faults.describe(wrapped) == f"no space left on device at {written}: {remedy}"
