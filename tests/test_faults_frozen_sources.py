"""Fault: a LoRA run's frozen base changes under it (issue 11, item 5).

The base run is extended after the LoRA run trained: the same adapters must still export with
(and resume on) the base they were trained on, and a base that is gone or rewritten must be
refused, never silently swapped.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jtrain import frozen_sources, run, runs
from jtrain.checkpoint import CheckpointError
from tests.conftest import tiny_config

BASE_STEPS = 2


def _base_config(steps):
    return tiny_config(
        train__steps=steps, eval__every_steps=0, checkpoint__every_steps=1, eval__steps=1
    )


def _lora_config(base):
    return tiny_config(
        model__init_from=base,
        model__lora__rank=2,
        train__steps=2,
        eval__every_steps=0,
        checkpoint__every_steps=0,
        eval__steps=1,
    )


def _weights(workdir):
    return jax.tree.map(np.asarray, nnx.state(runs.trained_model(workdir), nnx.Param))


@pytest.fixture(scope="module")
def runs_(tmp_path_factory):
    """A base run, a LoRA run on it, and the LoRA run's exported weights before any change."""
    base = str(tmp_path_factory.mktemp("base"))
    run.train_and_evaluate(_base_config(BASE_STEPS), base)
    adapted = str(tmp_path_factory.mktemp("lora"))
    run.train_and_evaluate(_lora_config(base), adapted)
    return base, adapted, _weights(adapted)


def test_the_base_step_is_pinned_when_the_run_starts(runs_):
    base, adapted, _ = runs_
    with open(os.path.join(adapted, frozen_sources.FILE)) as f:
        pins = json.load(f)
    assert pins["base"]["spec"] == base
    assert pins["base"]["version"]["step"] == BASE_STEPS
    assert isinstance(pins["base"]["version"]["committed"], int)


def test_extending_the_base_run_leaves_the_adapted_model_as_it_was(runs_, tmp_path):
    base, adapted, before = runs_
    extended = str(tmp_path / "base")
    shutil.copytree(base, extended)
    moved = str(tmp_path / "lora")
    shutil.copytree(adapted, moved)
    _point_at(moved, extended)
    run.train_and_evaluate(_base_config(BASE_STEPS + 2), extended)  # the base run goes on
    after = _weights(moved)
    # Export, eval and resume all rebuild the base through Experiment.load_sources.
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_rewritten_or_vanished_base_checkpoint_is_refused(runs_, tmp_path):
    base, adapted, _ = runs_
    copy, moved = str(tmp_path / "base"), str(tmp_path / "lora")
    shutil.copytree(base, copy)
    shutil.copytree(adapted, moved)
    _point_at(moved, copy)
    metadata = os.path.join(copy, "checkpoints", str(BASE_STEPS), "_CHECKPOINT_METADATA")
    with open(metadata) as f:
        content = json.load(f)
    content["commit_timestamp_nsecs"] += 1  # as a rerun of the base would rewrite the step
    with open(metadata, "w") as f:
        json.dump(content, f)
    with pytest.raises(CheckpointError, match=f"checkpoint of step {BASE_STEPS} was rewritten"):
        runs.trained_model(moved)
    shutil.rmtree(os.path.join(copy, "checkpoints", str(BASE_STEPS)))
    with pytest.raises(CheckpointError, match=f"checkpoint of step {BASE_STEPS} is gone"):
        run.train_and_evaluate(_lora_config(copy), moved)


def test_changed_files_of_an_hf_base_are_refused(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"1234")
    pinned = frozen_sources.version(f"hf:{hf}")
    (hf / "model.safetensors").write_bytes(b"12345")
    assert "model.safetensors" in frozen_sources._changed(f"hf:{hf}", pinned)
    assert frozen_sources._changed(f"hf:{hf}", frozen_sources.version(f"hf:{hf}")) is None


def _point_at(lora_workdir, base):
    """A copied LoRA run made to name the copied base (config.json and the pins)."""
    for name in ("config.json", frozen_sources.FILE):
        path = os.path.join(lora_workdir, name)
        with open(path) as f:
            content = json.load(f)
        if name == "config.json":
            content["model"]["init_from"] = base
        else:
            content["base"]["spec"] = base
        with open(path, "w") as f:
            json.dump(content, f)
