"""Exact tests of the learning-rate schedules, the optimizers and the weight-decay mask."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jtrain import optim

_DEFAULT = pathlib.Path(__file__).parents[1] / "configs" / "default.py"


def _config(**overrides):
    """Returns a copy of the default config with `section__field=value` overrides applied."""
    spec = importlib.util.spec_from_file_location("default_config", _DEFAULT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config().copy_and_resolve_references()
    for key, value in overrides.items():
        section, field = key.split("__")
        cfg[section][field] = value
    return cfg


class _Norm(nnx.Module):
    def __init__(self):
        self.scale = nnx.Param(jnp.full((4,), 2.0))
        self.bias = nnx.Param(jnp.full((4,), 0.5))


class _Tiny(nnx.Module):
    def __init__(self):
        # Fixed nonzero values: no RNG to compile, and decay visibly changes the kernels.
        self.embedding = nnx.Param(jnp.asarray(np.linspace(-1.0, 1.5, 24).reshape(6, 4)))
        self.kernel = nnx.Param(jnp.asarray(np.linspace(0.5, -2.0, 16).reshape(4, 4)))
        self.bias = nnx.Param(jnp.ones((4,)))
        self.norm = _Norm()
        # Stacked along a leading layers axis: the scale is 2-D yet must not decay.
        self.layers = nnx.Dict(
            ln=nnx.Dict(scale=nnx.Param(jnp.ones((3, 4)))),
            mlp=nnx.Dict(kernel=nnx.Param(jnp.ones((3, 4, 4)))),
        )


def _params():
    _, params = nnx.split(_Tiny(), nnx.Param)
    return params


def _values(tree):
    """Returns {dotted path: leaf} for a pytree, with nnx's trailing `.value` kept in the path."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in flat}


# lr=1, warmup 10, 110 steps, end at 0.1; wsd decays over the last 22 steps (88..110).
_COS_QUARTER = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4))  # cosine, 25 of 100 decay steps done
_SCHEDULE_CASES = {
    "constant": {0: 0.0, 5: 0.5, 10: 1.0, 35: 1.0, 60: 1.0, 109: 1.0, 110: 1.0},
    "cosine": {0: 0.0, 5: 0.5, 10: 1.0, 35: _COS_QUARTER, 60: 0.55, 110: 0.1, 500: 0.1},
    "linear": {0: 0.0, 5: 0.5, 10: 1.0, 35: 0.775, 60: 0.55, 110: 0.1, 500: 0.1},
    "wsd": {0: 0.0, 5: 0.5, 10: 1.0, 60: 1.0, 88: 1.0, 99: 0.55, 110: 0.1, 500: 0.1},
}


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_schedule_values(name):
    cfg = _config(
        optimizer__lr=1.0,
        schedule__name=name,
        schedule__warmup_steps=10,
        schedule__final_lr_ratio=0.1,
        schedule__decay_fraction=0.2,
    )
    schedule = optim.make_schedule(cfg.optimizer, cfg.schedule, total_steps=110)
    steps, expected = zip(*_SCHEDULE_CASES[name].items(), strict=True)
    # The trainer calls the schedule inside jit with a traced step; all steps in one call.
    got = jax.jit(schedule)(jnp.asarray(steps, jnp.int32))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert float(schedule(5)) == pytest.approx(0.5)  # a Python int step works too


def test_cosine_midpoint_matches_formula_at_default_lr():
    cfg = _config(schedule__name="cosine")  # lr 3e-3, warmup 50, end ratio 0.1
    schedule = optim.make_schedule(cfg.optimizer, cfg.schedule, total_steps=600)
    t = 0.3  # fraction of the 550 decay steps done at step 215
    expected = 3e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)))
    assert float(schedule(215)) == pytest.approx(expected, rel=1e-5)
    assert float(schedule(25)) == pytest.approx(1.5e-3, rel=1e-6)


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_schedule_without_warmup_starts_at_peak(name):
    cfg = _config(optimizer__lr=2.0, schedule__name=name, schedule__warmup_steps=0)
    schedule = optim.make_schedule(cfg.optimizer, cfg.schedule, total_steps=100)
    assert float(schedule(0)) == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_warmup_spanning_all_steps_ends_at_final_value(name):
    cfg = _config(optimizer__lr=1.0, schedule__name=name, schedule__warmup_steps=20)
    schedule = optim.make_schedule(cfg.optimizer, cfg.schedule, total_steps=20)
    assert float(schedule(10)) == pytest.approx(0.5)
    assert float(schedule(20)) == pytest.approx(0.1)


def test_long_warmup_is_clamped_to_a_tenth_of_the_run():
    cfg = _config(train__steps=20)  # the default recipe's 50 warmup steps in a 20-step run
    warmup, note = optim.effective_warmup(cfg.schedule, 20)
    assert warmup == 2
    assert note == (
        "schedule.warmup_steps=50 is longer than the 20-step run: warming up over 2 steps "
        "(10% of train.steps) instead; set --config.schedule.warmup_steps=N (0 to 20) to choose."
    )
    assert optim.validate(cfg) == [note]
    # 10% rounds down; a run under 10 steps has no warmup at all.
    assert optim.effective_warmup(cfg.schedule, 29)[0] == 2
    assert optim.effective_warmup(cfg.schedule, 9)[0] == 0
    # A warmup that fits, the whole run included, is kept as given.
    assert optim.effective_warmup(cfg.schedule, 50) == (50, None)


def test_twenty_step_run_peaks_at_step_two():
    cfg = _config(train__steps=20)  # lr 3e-3, cosine to 0.1 x lr, warmup 50 -> 2
    schedule = optim.make_schedule(cfg.optimizer, cfg.schedule, total_steps=20)
    lrs = np.asarray(jax.jit(schedule)(jnp.arange(21)))
    assert int(np.argmax(lrs)) == 2
    np.testing.assert_allclose(lrs[:3], [0.0, 1.5e-3, 3e-3], rtol=1e-6)
    assert lrs[20] == pytest.approx(3e-4, rel=1e-5)
    assert (np.diff(lrs[2:]) < 0).all()  # then decays over the remaining 18 steps


def test_run_shorter_than_ten_steps_starts_at_peak():
    cfg = _config(optimizer__lr=1.0, schedule__name="constant")
    schedule = optim.make_schedule(cfg.optimizer, cfg.schedule, total_steps=5)
    assert float(schedule(0)) == pytest.approx(1.0)


def test_negative_warmup_is_still_an_error():
    cfg = _config(schedule__warmup_steps=-1)
    message = "config.schedule.warmup_steps=-1 is invalid: must be >= 0."
    for check in (
        lambda: optim.effective_warmup(cfg.schedule, 100),
        lambda: optim.make_schedule(cfg.optimizer, cfg.schedule, total_steps=100),
        lambda: optim.validate(cfg),
    ):
        with pytest.raises(ValueError) as err:
            check()
        assert str(err.value) == message


def test_default_config_validates_without_notes():
    assert optim.validate(_config()) == []
    # decay_fraction's range is (0, 1]: the whole run may decay.
    assert optim.validate(_config(schedule__name="wsd", schedule__decay_fraction=1.0)) == []


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("optimizer.name", "adamz", "allowed: adamw, adafactor, lion, sgd"),
        ("optimizer.lr", 0.0, "must be positive"),
        ("optimizer.weight_decay", -0.1, "must be >= 0"),
        ("optimizer.clip_norm", -1.0, "must be >= 0 (0 = off)"),
        ("optimizer.b1", 1.0, "must be in [0, 1)"),
        ("optimizer.b2", -0.5, "must be in [0, 1)"),
        ("schedule.name", "step", "allowed: constant, cosine, linear, wsd"),
        ("schedule.warmup_steps", -5, "must be >= 0"),
        ("schedule.final_lr_ratio", 1.5, "must be in [0, 1]"),
        ("schedule.decay_fraction", 0.0, "must be in (0, 1]"),
    ],
)
def test_validate_names_key_value_and_what_is_allowed(key, value, allowed):
    cfg = _config(**{key.replace(".", "__"): value})
    with pytest.raises(ValueError) as err:
        optim.validate(cfg)
    assert str(err.value) == f"config.{key}={value!r} is invalid: {allowed}."


def test_decay_mask_on_nnx_state():
    params = _params()
    mask = optim.decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    got = {path: bool(m) for path, m in _values(mask).items()}
    assert got == {
        "['bias'].value": False,
        "['embedding'].value": True,
        "['kernel'].value": True,
        "['layers']['ln']['scale'].value": False,
        "['layers']['mlp']['kernel'].value": True,
        "['norm']['bias'].value": False,
        "['norm']['scale'].value": False,
    }


def test_decay_mask_on_dicts():
    params = {
        "embed": {"embedding": jnp.ones((5, 2))},
        "layers": {
            "attn_norm": {"weight": jnp.ones((3, 2))},
            "mlp": {"kernel": jnp.ones((3, 2, 2)), "bias": jnp.ones((3, 2))},
        },
    }
    mask = optim.decay_mask(params)
    assert mask == {
        "embed": {"embedding": True},
        "layers": {"attn_norm": {"weight": False}, "mlp": {"kernel": True, "bias": False}},
    }


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizer_decays_masked_leaves_then_trains(name):
    lr, wd = 0.1, 0.5
    # Defaults otherwise (cosine, clipping on); no warmup so step 0 runs at the peak lr.
    cfg = _config(
        optimizer__name=name,
        optimizer__lr=lr,
        optimizer__weight_decay=wd,
        schedule__warmup_steps=0,
    )
    tx, _ = optim.make_optimizer(cfg.optimizer, cfg.schedule, total_steps=10)

    @jax.jit  # one compile instead of dispatching every optax op eagerly
    def step(params, opt_state, grad_scale, shift):
        grads = jax.tree.map(lambda p: grad_scale * jnp.sin(p + shift), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # Zero gradients leave only the decoupled decay: each masked leaf becomes p - lr * wd * p.
    params = _params()
    new_params, opt_state = step(params, tx.init(params), 0.0, 0.0)
    old, new = _values(params), _values(new_params)
    for path in ("['kernel'].value", "['embedding'].value", "['layers']['mlp']['kernel'].value"):
        np.testing.assert_allclose(new[path], old[path] - lr * wd * old[path], rtol=1e-6)
    for path in (
        "['bias'].value",
        "['norm']['scale'].value",
        "['norm']['bias'].value",
        "['layers']['ln']['scale'].value",
    ):
        np.testing.assert_array_equal(new[path], old[path])

    # Real gradients then move every leaf and keep it finite.
    before = [np.asarray(x) for x in jax.tree.leaves(new_params)]
    for shift in (1.0, 2.0):
        new_params, opt_state = step(new_params, opt_state, 1.0, shift)
    after = [np.asarray(x) for x in jax.tree.leaves(new_params)]
    assert all(np.isfinite(x).all() for x in after)
    assert all((a != b).any() for a, b in zip(after, before, strict=True))


def test_clipping_bounds_the_global_norm():
    cfg = _config(
        optimizer__name="sgd",
        optimizer__lr=1.0,
        optimizer__b1=0.0,  # no momentum: the update is -lr * the clipped gradient
        optimizer__weight_decay=0.0,
        optimizer__clip_norm=0.5,
        schedule__name="constant",
        schedule__warmup_steps=0,
    )
    tx, _ = optim.make_optimizer(cfg.optimizer, cfg.schedule, total_steps=10)
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(0.5, rel=1e-5)
    # Clipping rescales, so the direction is the gradient's.
    leaves = jax.tree.leaves(updates)
    n = sum(x.size for x in leaves)
    for x in leaves:
        np.testing.assert_allclose(x, -0.5 / np.sqrt(n), rtol=1e-5)
