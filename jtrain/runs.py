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

from jtrain import checkpoint
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


def trained_model(workdir: str, *, step: int | None = None) -> nnx.Module:
    """The run's model with the weights of its checkpoint at `step` (None = the latest).

    A LoRA run's checkpoint holds its adapters only: the frozen base is rebuilt as the run
    built it (from model.init_from, or from the seed), and the adapters are merged into it.
    """
    config = run_config(workdir)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    exp = Experiment.from_config(config, _host_devices())
    params = checkpoint.load_params(workdir, exp.abstract_sharded_state().params, step=step)
    if not exp.has_frozen_base():
        return nnx.merge(exp.graphdef, params)
    return lora.merge(nnx.merge(exp.graphdef, params, exp.rebuild_frozen()[BASE]))
