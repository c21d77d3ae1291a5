"""A finished run, read back from its workdir: the config it saved and its trained model.

Used by everything that works on a run after training: `jtrain.export`, `jtrain.generate`.
The model is built on one host device, whatever mesh the run used (the readers gather every
tensor to the host anyway).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from flax import nnx

from jtrain import checkpoint, early_stopping, frozen_sources, tasks
from jtrain.experiment import Experiment
from jtrain.models import lora
from jtrain.state import BASE


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in workdir/config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise checkpoint.CheckpointError(f"{workdir} is not a jtrain workdir: {path} is missing")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _host_devices() -> list[jax.Device]:
    """One device in host memory (the writer gathers every tensor to the host anyway)."""
    try:
        return jax.devices("cpu")[:1]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return jax.local_devices()[:1]


def saved_artifacts(workdir: str, task: tasks.Task) -> dict[str, dict]:
    """The files of `task.artifacts_names()` that workdir holds, by name (`Task.artifacts`)."""
    files = {}
    for name in task.artifacts_names():
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            with open(path) as f:
                files[name] = json.load(f)
    return files


def run_task(workdir: str, config: ml_collections.ConfigDict | None = None) -> tasks.Task:
    """The run's task with the files it saved (`Task.artifacts`, e.g. a table's
    preprocessing) taken back, so it needs none of the training data."""
    config = run_config(workdir) if config is None else config
    task = tasks.get(config)
    task.load_artifacts(saved_artifacts(workdir, task))
    return task


def trained_model(workdir: str, *, step: int | None = None) -> nnx.Module:
    """The run's model with the weights of its checkpoint at `step` (None = the run's final
    weights: the newest readable checkpoint, or the best one where early stopping chose it).

    A LoRA run's checkpoint holds its adapters only: the frozen base is rebuilt as the run
    built it (from model.init_from, or from the seed), and the adapters are merged into it.
    """
    config = run_config(workdir)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    task = run_task(workdir, config)
    exp = Experiment.from_config(config, _host_devices(), task=task)
    frozen_sources.apply(exp, frozen_sources.read(workdir) or {}, workdir)
    step = early_stopping.final_step(workdir) if step is None else step
    abstract = exp.abstract_sharded_state().params
    params = checkpoint.load_params(workdir, abstract, step=step, config_key=None)
    if not exp.has_frozen_base():
        return nnx.merge(exp.graphdef, params)
    return lora.merge(nnx.merge(exp.graphdef, params, exp.rebuild_frozen()[BASE]))
