"""Sharded runs match the single-device run; FSDP divides memory; accumulation is exact."""

import itertools

import jax
import numpy as np
import pytest

from jtrain import config as config_lib
from jtrain.data import pipeline
from jtrain.experiment import Experiment

STEPS = 6
MESHES = {
    "1 device": dict(data=1, fsdp=1, tensor=1),
    "data=8": dict(data=8, fsdp=1, tensor=1),
    "fsdp=8": dict(data=1, fsdp=8, tensor=1),
    # Every axis at once: tensor splits heads (2 kv heads a device) while data and fsdp split
    # the batch and fsdp the parameters. A second mixed mesh (data=2 x tensor=4) ran the same
    # code paths again at the price of two more compiles.
    "data=2 x fsdp=2 x tensor=2": dict(data=2, fsdp=2, tensor=2),
}


def tiny_config(**mesh):
    config = config_lib.load("configs/tiny.py")
    config.mesh.update(mesh)
    return config


@pytest.fixture(scope="module")
def batches():
    config = tiny_config()
    return list(itertools.islice(pipeline.make_train_iterator(config), STEPS))


@pytest.fixture(scope="module")
def losses_by_mesh(batches):
    losses = {}
    for name, mesh in MESHES.items():
        devices = jax.devices()[: 1 if name == "1 device" else 8]
        exp = Experiment.from_config(tiny_config(**mesh), devices)
        state = exp.init_state()
        losses[name] = []
        for batch in batches:
            state, metrics = exp.train_step(state, exp.global_batch(batch))
            losses[name].append(float(metrics["loss"]))
    return losses


@pytest.mark.parametrize("name", [n for n in MESHES if n != "1 device"])
def test_sharded_losses_match_single_device(losses_by_mesh, name):
    # Sharding changes only the order of float32 reductions (all-reduces, split matmuls):
    # differences of a few ulps per op that stay far below 1e-4 relative after 6 steps.
    reference = np.array(losses_by_mesh["1 device"])
    np.testing.assert_allclose(losses_by_mesh[name], reference, rtol=1e-4)
    assert reference[-1] < reference[0]  # the steps did train


def _bytes_on_first_device(tree) -> int:
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def test_fsdp_divides_parameter_and_optimizer_memory_per_device():
    replicated = Experiment.from_config(tiny_config(data=8, fsdp=1, tensor=1)).init_state()
    sharded = Experiment.from_config(tiny_config(data=1, fsdp=8, tensor=1)).init_state()
    params_ratio = _bytes_on_first_device(replicated.params) / _bytes_on_first_device(
        sharded.params
    )
    opt_ratio = _bytes_on_first_device(replicated.opt_state) / _bytes_on_first_device(
        sharded.opt_state
    )
    assert params_ratio == 8.0
    assert opt_ratio > 7.99  # only adam's scalar step count stays replicated
    for leaf in jax.tree.leaves(sharded.params):
        assert leaf.addressable_shards[0].data.size * 8 == leaf.size


def test_compiled_step_arguments_shrink_under_fsdp(batches):
    sizes = {}
    for name, mesh in {"data": dict(data=8), "fsdp": dict(data=1, fsdp=8)}.items():
        exp = Experiment.from_config(tiny_config(**mesh))
        state = exp.init_state()
        compiled = exp.train_step.lower(state, exp.global_batch(batches[0])).compile()
        sizes[name] = compiled.memory_analysis().argument_size_in_bytes
    # Arguments are the state (shrinks 8x) plus the batch shard (the same in both).
    assert sizes["data"] / sizes["fsdp"] > 6


def test_gradient_accumulation_equals_one_big_batch(batches):
    mesh = dict(data=2, fsdp=2, tensor=2)
    results = []
    for microbatches in (1, 4):
        config = tiny_config(**mesh)
        config.train.microbatches = microbatches
        exp = Experiment.from_config(config)
        state, metrics = exp.train_step(exp.init_state(), exp.global_batch(batches[0]))
        results.append((jax.device_get(state.params), float(metrics["loss"])))
    (big_params, big_loss), (acc_params, acc_loss) = results
    np.testing.assert_allclose(acc_loss, big_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(big_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_indivisible_sharding_names_the_parameter():
    config = tiny_config(data=1, fsdp=1, tensor=8)  # 4 kv heads cannot split 8 ways
    with pytest.raises(ValueError, match=r"k_DxGxK.*does not divide"):
        Experiment.from_config(config)
