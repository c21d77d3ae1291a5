"""Checkpoint layouts (issue 14, item 4): a large state is saved array by array, readable by
plain Orbax, and keeps every promise the packed layout keeps (checksums, the finite check,
any mesh, walk-back past damage, async save, bit-for-bit resume); packed checkpoints as
today's and earlier code wrote them still restore; each process's data position is saved.
Also: checkpoint paths that are URLs are refused."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jtrain import checkpoint, checkpoint_data, checkpoint_faults, checkpoint_layout, run
from jtrain.experiment import Experiment
from jtrain.metrics import read_metrics
from tests import faults
from tests.conftest import tiny_config, train_losses


def _data(tree) -> list[np.ndarray]:
    """The leaves as numpy, PRNG keys as their key data."""
    keys = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
    return [np.asarray(jax.random.key_data(x) if keys(x) else x) for x in jax.tree.leaves(tree)]


def _assert_equal(a, b) -> None:
    for x, y in zip(_data(a), _data(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _custom(workdir, step: int) -> dict:
    with open(os.path.join(faults.step_dir(workdir, step), "_CHECKPOINT_METADATA")) as f:
        return json.load(f)["custom_metadata"]


@pytest.fixture(scope="module")
def tiny():
    exp = Experiment.from_config(tiny_config())
    return exp, exp.init_state()


def _save(workdir, state, step: int, layout: str, **kwargs) -> checkpoint.Checkpoints:
    ckpts = checkpoint.Checkpoints(workdir, tiny_config().checkpoint, layout=layout, **kwargs)
    state = state.replace(step=jnp.asarray(step, state.step.dtype))
    ckpts.save(state, data_state={"next": step}, config={}, started=0.0)
    ckpts.wait()
    return ckpts


def _restore(workdir, exp):
    return checkpoint.Checkpoints(workdir, tiny_config().checkpoint).restore_latest(
        exp.abstract_sharded_state()
    )


def test_auto_packs_a_small_state_and_saves_a_large_one_per_array(tiny, monkeypatch):
    _, state = tiny
    assert checkpoint_layout.state_bytes(state) < checkpoint_layout.PACK_BELOW_BYTES
    assert checkpoint_layout.choose(state) == "packed"
    monkeypatch.setattr(checkpoint_layout, "PACK_BELOW_BYTES", 1)
    assert checkpoint_layout.choose(state) == "arrays"
    assert checkpoint_layout.choose(state, "packed") == "packed"
    with pytest.raises(ValueError, match="layout='flat' is not one of auto, packed, arrays"):
        checkpoint.Checkpoints("unused", tiny_config().checkpoint, layout="flat")


def test_per_array_checkpoints_restore_exactly_and_plain_orbax_reads_them(tiny, tmp_path):
    exp, state = tiny
    own = exp.init_state()  # the same values, in buffers of its own to donate
    ckpts = _save(tmp_path, own, 3, "arrays")
    # The save copied nothing: the next step may donate the state while Orbax writes.
    jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)(own.params)
    ckpts.close()
    assert _custom(tmp_path, 3)["layout"]["kind"] == "arrays"
    restored, data, step = _restore(tmp_path, exp)
    assert (step, data) == (3, {"next": 3})
    _assert_equal(restored.replace(step=state.step), state)
    plain = ocp.StandardCheckpointer().restore(os.path.join(faults.step_dir(tmp_path, 3), "state"))
    saved = jax.tree.leaves(state.params["blocks"]["mlp"]["gate_DxF"])[0]
    np.testing.assert_array_equal(plain["params"]["blocks"]["mlp"]["gate_DxF"], saved)


@pytest.mark.parametrize("layout", ["packed", "arrays"])
def test_either_layout_restores_onto_another_mesh_and_loads_params(tiny, tmp_path, layout):
    _, state = tiny
    _save(tmp_path, state, 1, layout).close()
    config = tiny_config()
    config.mesh.update(dict(data=2, fsdp=2, tensor=2))
    other = Experiment.from_config(config)
    restored, _, _ = _restore(tmp_path, other)
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding.mesh.shape == other.mesh.shape
    _assert_equal(restored.params, state.params)
    one = Experiment.from_config(tiny_config(), jax.devices()[:1])
    _assert_equal(
        checkpoint.load_params(str(tmp_path), one.abstract_sharded_state().params), state.params
    )


@pytest.mark.parametrize("layout", ["packed", "arrays"])
def test_either_layout_refuses_non_finite_states_and_falls_back_past_flipped_bits(
    tiny, tmp_path, layout
):
    exp, state = tiny
    leaves, treedef = jax.tree.flatten(state.params)
    poisoned = state.replace(params=jax.tree.unflatten(treedef, [leaves[0] * jnp.nan, *leaves[1:]]))
    ckpts = checkpoint.Checkpoints(tmp_path, tiny_config().checkpoint, layout=layout)
    assert not ckpts.save(poisoned, data_state={}, config={}, started=0.0)
    ckpts.close()
    _save(tmp_path, state, 1, layout).close()
    _save(tmp_path, state, 2, layout).close()
    faults.flip_bits(faults.data_files(tmp_path, 2)[0])  # the largest: array bytes
    _, _, step = _restore(tmp_path, exp)
    assert step == 1
    aside = checkpoint_faults.damaged_directory(os.path.join(tmp_path, "checkpoints"))
    with open(os.path.join(aside, "2", checkpoint_faults.NOTE)) as f:
        assert "checksum mismatch in " in f.read()


def test_packed_checkpoints_as_earlier_code_wrote_them_still_restore(tiny, tmp_path):
    exp, state = tiny
    _save(tmp_path, state, 4, "packed").close()
    # Before the per-array layout a packed layout had no "kind": write it that way.
    path = os.path.join(faults.step_dir(tmp_path, 4), "_CHECKPOINT_METADATA")
    with open(path) as f:
        metadata = json.load(f)
    del metadata["custom_metadata"]["layout"]["kind"]
    with open(path, "w") as f:
        json.dump(metadata, f)
    restored, data, step = _restore(tmp_path, exp)
    assert (step, data) == (4, {"next": 4})
    _assert_equal(restored.params, state.params)


@pytest.fixture(scope="module")
def per_array_runs(tmp_path_factory):
    """A 20-step tiny run saved per array (checkpoints 10, 15, 20), and a copy of it that lost
    checkpoints 15 and 20 (a run killed after step 10's save) run again to the end."""
    root = tmp_path_factory.mktemp("arrays")
    config = dict(checkpoint__every_steps=5, eval__every_steps=0, train__log_every=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint_layout, "PACK_BELOW_BYTES", 1)  # every state saved per array
        run.train_and_evaluate(tiny_config(**config), str(root / "whole"))
        shutil.copytree(root / "whole", root / "resumed")
        for step in (15, 20):
            shutil.rmtree(faults.step_dir(root / "resumed", step))
        run.train_and_evaluate(tiny_config(**config), str(root / "resumed"))
    return root


def test_a_run_saved_per_array_resumes_bit_for_bit(per_array_runs):
    whole = train_losses(per_array_runs / "whole")
    resumed = train_losses(per_array_runs / "resumed")
    assert sorted(resumed) == sorted(whole) == list(range(1, 21))
    assert resumed == whole

    events = read_metrics(str(per_array_runs / "resumed" / "metrics.jsonl"))
    assert [e["step"] for e in events if e["split"] == "resume"] == [10]
    assert _custom(per_array_runs / "whole", 20)["layout"]["kind"] == "arrays"


def test_each_process_position_is_saved_and_given_back(monkeypatch):
    positions = [{"next": 7, "worker": 0}, {"next": 7, "worker": 1}]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)

    def allgather(x):  # process 1 holds `x`; process 0's is the first position
        mine = np.asarray(x)
        if mine.ndim == 0:
            return np.asarray([len(json.dumps(positions[0])), int(mine)])
        first = np.frombuffer(json.dumps(positions[0]).encode(), np.uint8)
        return np.stack([np.pad(first, (0, mine.size - first.size)), mine])

    monkeypatch.setattr(checkpoint_data.multihost_utils, "process_allgather", allgather)
    custom = checkpoint_data.gathered(positions[1])
    assert custom == {"data": positions[0], "data_per_process": positions}
    assert checkpoint_data.own(custom, "step 7") == positions[1]
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(checkpoint_data.DataPositionError, match="resume it with 2 processes"):
        checkpoint_data.own(custom, "step 7")
    alike = {"data": positions[0], "data_per_process": [positions[0]] * 2}
    assert checkpoint_data.own(alike, "step 7") == positions[0]


def test_a_url_checkpoint_path_is_refused_with_what_works_instead(tiny, tmp_path, monkeypatch):
    exp, _ = tiny
    monkeypatch.chdir(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=r"init_from=gs://b/r is a URL.*gcsfuse"):
        checkpoint.load_params("gs://b/r", exp.abstract_sharded_state().params)
    assert os.listdir(tmp_path) == []
