"""Checkpoints and faults: exact resume after SIGKILL, SIGTERM preemption, non-finite
policies, damaged and mismatched checkpoints, resharding, refusal to overwrite, init_from."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain import checkpoint, run
from jtrain import config as config_lib
from jtrain.experiment import Experiment
from jtrain.metrics import read_metrics
from jtrain.tasks.lm import LMTask
from tests import conftest
from tests.conftest import REPO, tiny_config, train_losses

# Long enough (a few ms per step) that a kill lands mid-run, between checkpoints.
RUN_FLAGS = [
    "--config=configs/tiny.py",
    "--config.train.steps=120",
    "--config.train.log_every=1",
    "--config.eval.every_steps=0",
    "--config.eval.sample_tokens=0",
    "--config.checkpoint.every_steps=7",
]


def start_main(workdir, *flags):
    return conftest.start_main(workdir, *RUN_FLAGS, *flags)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def wait_for_step(workdir, step, proc, timeout=120):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if os.path.exists(path) and max(train_losses(workdir) or [0]) >= step:
            return
        time.sleep(0.02)
    raise TimeoutError(f"step {step} never logged")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    finish(start_main(workdir))
    return train_losses(workdir)


def test_sigkill_then_rerun_reproduces_every_loss_bit_for_bit(uninterrupted, tmp_path):
    proc = start_main(tmp_path)
    wait_for_step(tmp_path, 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(train_losses(tmp_path))
    assert killed_at < 120
    out = finish(start_main(tmp_path))
    assert "resumed from" in out
    assert train_losses(tmp_path) == uninterrupted  # exact float equality, all 120 steps


def test_sigterm_saves_the_current_step_exits_cleanly_and_resumes(uninterrupted, tmp_path):
    proc = start_main(tmp_path)
    wait_for_step(tmp_path, 40, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert "preempted; saved step" in out
    saved = int(out.split("preempted; saved step ")[1].split()[0])
    assert saved in checkpoint.Checkpoints(tmp_path, _ckpt_cfg()).steps()
    out = finish(start_main(tmp_path))
    assert f"at step {saved}" in out
    assert train_losses(tmp_path) == uninterrupted


def _ckpt_cfg():
    return config_lib.load("configs/tiny.py").checkpoint


class PoisonedLM(LMTask):
    """The LM loss, made NaN for any batch whose first input token is `poison`."""

    def __init__(self, config, poison):
        super().__init__(config)
        self.poison = poison

    def loss(self, model, batch, *, dropout_rng=None, frozen=None):
        out = super().loss(model, batch, dropout_rng=dropout_rng, frozen=frozen)
        nan_if_poisoned = jnp.where(batch["inputs"][0, 0] == self.poison, jnp.nan, 1.0)
        return out.replace(loss_sum=out.loss_sum * nan_if_poisoned)


def test_a_non_finite_step_keeps_params_and_optimizer_state_and_counts_it():
    config = tiny_config()
    task = PoisonedLM(config, poison=300)
    exp = Experiment.from_config(config, task=task)
    state = exp.init_state()
    before = jax.device_get(state)
    tokens = np.full((16, 32), 300, np.int32)
    batch = {"inputs": tokens, "targets": tokens, "loss_weight": np.ones((16, 32), np.float32)}
    state, metrics = exp.train_step(state, exp.global_batch(batch))
    after = jax.device_get(state)
    assert float(metrics["nonfinite"]) == 1.0
    assert int(after.skipped) == 1 and int(after.step) == 1
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_the_logged_lr_is_the_rate_applied_after_a_skipped_step():
    # A skipped update leaves the optimizer's step count behind the train step: the next
    # update applies the schedule at that count, and that is the rate the step reports.
    config = tiny_config()
    exp = Experiment.from_config(config, task=PoisonedLM(config, poison=300))
    state = exp.init_state()
    poisoned = np.full((16, 32), 300, np.int32)
    clean = np.ones((16, 32), np.int32)
    for tokens in (poisoned, clean, clean):
        batch = {"inputs": tokens, "targets": tokens, "loss_weight": np.ones((16, 32), np.float32)}
        state, metrics = exp.train_step(state, exp.global_batch(batch))
    assert int(state.step) == 3 and int(state.skipped) == 1
    assert float(metrics["lr"]) == pytest.approx(float(exp.schedule(1)), rel=1e-6)
    assert float(exp.schedule(2)) > 1.5 * float(exp.schedule(1))  # in warmup: clearly apart


def _exploding(**overrides):
    # Adam with a huge learning rate and no clipping: finite at step 1, non-finite from step 2.
    return tiny_config(
        optimizer__lr=1e5,
        optimizer__clip_norm=0.0,
        schedule__warmup_steps=0,
        checkpoint__every_steps=1,
        **overrides,
    )


def test_halt_policy_names_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(run.NonFiniteError, match=r"at step 2;.*Last good checkpoint: step 1"):
        run.train_and_evaluate(_exploding(train__on_nonfinite="halt"), str(tmp_path))


def test_skip_policy_goes_on_and_never_writes_a_non_finite_checkpoint(tmp_path):
    run.train_and_evaluate(
        _exploding(train__on_nonfinite="skip", train__log_every=1), str(tmp_path)
    )
    events = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    skipped = [e["step"] for e in events if e.get("nonfinite") == 1.0]
    assert skipped and skipped[0] == 2
    # The run's end says how many updates it dropped in all (issue 11: it used to stay silent).
    total = [e["skipped_updates"] for e in events if "skipped_updates" in e]
    assert total == [len(skipped)]
    exp = Experiment.from_config(_exploding())
    ckpts = checkpoint.Checkpoints(tmp_path, _exploding().checkpoint)
    state, _, step = ckpts.restore_latest(exp.abstract_sharded_state())
    assert step == 20 and int(state.skipped) >= len(skipped)
    leaves = jax.tree.leaves((state.params, state.opt_state))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 20-step tiny run with checkpoints at 10, 15 and 20 (keep=3)."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = tiny_config(checkpoint__every_steps=5, data__source=tiny_config().data.source)
    run.train_and_evaluate(config, workdir)
    return workdir


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path):
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(trained, workdir)
    steps = checkpoint.Checkpoints(workdir, _ckpt_cfg()).steps()
    assert steps == [10, 15, 20]  # keep=3 latest; the best (by val loss) is among them
    latest = os.path.join(workdir, "checkpoints", str(steps[-1]), "state")
    files = [os.path.join(d, f) for d, _, fs in os.walk(latest) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    exp = Experiment.from_config(tiny_config())
    ckpts = checkpoint.Checkpoints(workdir, _ckpt_cfg())
    _, _, step = ckpts.restore_latest(exp.abstract_sharded_state())
    assert step == steps[-2]


def test_checkpoint_of_another_shape_names_the_mismatched_parameters(trained):
    exp = Experiment.from_config(tiny_config(model__d_ff=256))
    ckpts = checkpoint.Checkpoints(trained, _ckpt_cfg())
    with pytest.raises(checkpoint.CheckpointError) as err:
        ckpts.restore_latest(exp.abstract_sharded_state())
    assert "params/blocks/mlp/gate_DxF: checkpoint (2, 64, 128) vs config (2, 64, 256)" in str(
        err.value
    )


@pytest.mark.parametrize(
    "mesh, devices",
    [(dict(data=2, fsdp=2, tensor=2), 8), (dict(data=1, fsdp=1, tensor=1), 1)],
)
def test_restore_onto_another_mesh_gives_identical_values(trained, mesh, devices):
    saved_exp = Experiment.from_config(tiny_config())
    saved, _, step = checkpoint.Checkpoints(trained, _ckpt_cfg()).restore_latest(
        saved_exp.abstract_sharded_state()
    )
    config = tiny_config()
    config.mesh.update(mesh)
    exp = Experiment.from_config(config, jax.devices()[:devices])
    restored, _, _ = checkpoint.Checkpoints(trained, _ckpt_cfg()).restore_latest(
        exp.abstract_sharded_state()
    )
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding.mesh.shape == exp.mesh.shape
    for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(restored.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_loads_parameters_only(trained, tmp_path):
    exp = Experiment.from_config(tiny_config())
    source, _, _ = checkpoint.Checkpoints(trained, _ckpt_cfg()).restore_latest(
        exp.abstract_sharded_state()
    )
    params = checkpoint.load_params(trained, exp.abstract_sharded_state().params)
    for a, b in zip(jax.tree.leaves(source.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    short = dict(train__steps=2, eval__every_steps=1, schedule__warmup_steps=0)
    results = run.train_and_evaluate(tiny_config(model__init_from=trained, **short), str(tmp_path))
    fresh = run.train_and_evaluate(tiny_config(**short), str(tmp_path / "fresh"))
    assert results["val"]["loss"] < fresh["val"]["loss"] - 0.3  # it starts from trained weights


def _tiny_state():
    exp = Experiment.from_config(tiny_config())
    return exp, exp.init_state()


def _save(ckpts, state, step, loss=None):
    state = state.replace(step=jnp.asarray(step, state.step.dtype))
    metrics = {"loss": loss} if loss is not None else None
    saved = ckpts.save(state, data_state={"next": step}, config={}, metrics=metrics, started=0.0)
    ckpts.wait()
    return saved


def test_retention_keeps_the_latest_n_plus_the_best(tmp_path):
    _, state = _tiny_state()
    ckpts = checkpoint.Checkpoints(tmp_path, _ckpt_cfg())  # keep=3, keep_best
    for step in range(1, 9):
        _save(ckpts, state, step, loss={2: 1.0, 4: 3.0}.get(step))
    assert ckpts.steps() == [2, 6, 7, 8]
    ckpts.close()
    on_disk = sorted(int(n) for n in os.listdir(ckpts.directory) if n.isdigit())
    assert on_disk == [2, 6, 7, 8]


def test_a_non_finite_state_is_never_saved(tmp_path):
    _, state = _tiny_state()
    leaves, treedef = jax.tree.flatten(state.params)
    poisoned = state.replace(params=jax.tree.unflatten(treedef, [leaves[0] * jnp.nan, *leaves[1:]]))
    ckpts = checkpoint.Checkpoints(tmp_path, _ckpt_cfg())
    assert not _save(ckpts, poisoned, 3)
    assert _save(ckpts, state, 4)
    assert ckpts.steps() == [4]


def test_a_fresh_process_restores_every_leaf_and_the_data_position(tmp_path):
    exp, state = _tiny_state()
    state = state.replace(skipped=jnp.asarray(2, state.skipped.dtype))
    ckpts = checkpoint.Checkpoints(tmp_path, _ckpt_cfg())
    _save(ckpts, state, 5)
    ckpts.close()
    script = (
        "import sys, numpy as np, jax\n"
        "from jtrain import checkpoint, config\n"
        "from jtrain.experiment import Experiment\n"
        "cfg = config.load('configs/tiny.py')\n"
        "exp = Experiment.from_config(cfg)\n"
        "ckpts = checkpoint.Checkpoints(sys.argv[1], cfg.checkpoint)\n"
        "state, data, step = ckpts.restore_latest(exp.abstract_sharded_state())\n"
        "state = state.replace(rng=jax.random.key_data(state.rng))\n"
        "np.savez(sys.argv[2], data=data['next'], step=step,"
        " **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})\n"
    )
    out = os.path.join(tmp_path, "restored.npz")
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), out], cwd=REPO, env=env, check=True
    )
    restored = np.load(out)
    assert int(restored["data"]) == 5 and int(restored["step"]) == 5
    expected = jax.tree.leaves(state.replace(step=5, rng=jax.random.key_data(state.rng)))
    for i, leaf in enumerate(expected):
        np.testing.assert_array_equal(restored[str(i)], np.asarray(leaf))


def test_damaged_step_metadata_falls_back_to_the_previous_checkpoint(tmp_path):
    exp, state = _tiny_state()
    ckpts = checkpoint.Checkpoints(tmp_path, _ckpt_cfg())
    _save(ckpts, state, 1)
    _save(ckpts, state, 2)
    ckpts.close()
    # The layout and data position live in the step's metadata file: lose half of it.
    meta = os.path.join(ckpts.directory, "2", "_CHECKPOINT_METADATA")
    with open(meta, "r+b") as f:
        f.truncate(os.path.getsize(meta) // 2)
    _, data, step = checkpoint.Checkpoints(tmp_path, _ckpt_cfg()).restore_latest(
        exp.abstract_sharded_state()
    )
    assert (step, data) == (1, {"next": 1})


def test_checkpoints_written_before_packing_still_restore(tmp_path):
    """The earlier layout: the state leaf by leaf, and data, config and meta as JSON items."""
    import orbax.checkpoint as ocp

    exp, state = _tiny_state()
    handlers = {"state": ocp.StandardCheckpointHandler()}
    handlers |= {name: ocp.JsonCheckpointHandler() for name in ("data", "config", "meta")}
    manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"), item_handlers=handlers)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"next": 7}),
        config=ocp.args.JsonSave({}),
        meta=ocp.args.JsonSave({"step": 0}),
    )
    manager.save(0, args=args)
    manager.close()
    restored, data, step = checkpoint.Checkpoints(tmp_path, _ckpt_cfg()).restore_latest(
        exp.abstract_sharded_state()
    )
    assert (step, data) == (0, {"next": 7})
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params = checkpoint.load_params(str(tmp_path), exp.abstract_sharded_state().params)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
