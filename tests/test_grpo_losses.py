"""GRPO advantages and policy loss: parity with TRL 1.16 and exact additivity over micro-batches.

The golden numbers in tests/golden/trl_grpo.json come from TRL's own GRPOTrainer
(tests/golden/make_trl_grpo_golden.py, which says how to rerun it). A mismatch in
`test_*_match_trl` means our formula drifted from TRL's; a mismatch only in
`test_golden_regenerates` means TRL changed (a new version): regenerate the JSON and decide
whether to follow it.
"""

import functools
import importlib.util
import json
import math
import operator
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain.tasks import grpo_losses

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
with open(os.path.join(GOLDEN_DIR, "trl_grpo.json")) as _f:
    GOLDEN = json.load(_f)
INPUTS = {name: jnp.asarray(value) for name, value in GOLDEN["loss_inputs"].items()}
# TRL runs in float32 torch, we in float32 XLA: sums in another order differ by a few ulps.
ATOL = 1e-5


def _terms(kind, inputs, beta=0.0, **overrides) -> grpo_losses.PolicyTerms:
    kwargs = dict(
        kind=kind,
        logps=inputs["logps"],
        old_logps=inputs["old_logps"],
        ref_logps=inputs["ref_logps"] if beta else None,
        advantages=inputs["advantages"],
        mask=inputs["mask"],
        epsilon=GOLDEN["epsilon"],
        epsilon_high=GOLDEN["epsilon_high"],
        beta=beta,
        max_completion_length=GOLDEN["max_completion_length"],
        entropy=inputs["entropy"],
        row_weight=inputs.get("row_weight"),
    )
    return grpo_losses.policy_loss(**(kwargs | overrides))


def _loss_and_grad(kind, inputs, parts=1, **kwargs):
    """(loss, d loss / d logps, terms) with the rows split into `parts` equal micro-batches
    whose terms are added, as a trainer accumulating gradients does."""

    def loss(logps):
        split = {k: v.reshape(parts, -1, *v.shape[1:]) for k, v in inputs.items()}
        split["logps"] = logps.reshape(parts, -1, logps.shape[1])
        # One vmapped call computes every micro-batch's terms: a smaller program to compile.
        stacked = jax.vmap(lambda part: _terms(kind, part, **kwargs))(split)
        terms = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(parts)]
        total = functools.reduce(operator.add, terms)
        return total.loss_sum / total.weight, total

    (value, terms), grad = jax.value_and_grad(loss, has_aux=True)(inputs["logps"])
    return value, grad, terms


# Each group of cases runs as ONE compiled program, once per session, at XLA's lowest
# optimisation level: compiling each case alone, or optimising, costs seconds of CPU time for
# these microsecond programs (and op-by-op dispatch is slower still).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.cache
def _trl_cases() -> dict:
    """Ours for every TRL loss case."""

    @_jit
    def run(inputs):
        return {
            case: _loss_and_grad(
                golden["loss_type"],
                inputs,
                beta=golden["beta"],
                bias_correction_kl=golden["use_bias_correction_kl"],
            )
            for case, golden in GOLDEN["losses"].items()
        }

    return run(INPUTS)


@functools.cache
def _property_cases() -> dict:
    """Every loss kind at beta 0.04: whole, in 2 and 4 micro-batches, with 3 padding rows; and
    on-policy at beta 0, with old_logps given and None."""
    n = INPUTS["logps"].shape[0]
    # Padding rows with a mask, a ratio far outside the clip range and large advantages.
    junk = {name: jnp.full((3,) + value.shape[1:], 5.0) for name, value in INPUTS.items()}
    junk["old_logps"] = -junk["old_logps"]
    padded = {name: jnp.concatenate([value, junk[name]]) for name, value in INPUTS.items()}
    padded["row_weight"] = jnp.concatenate([jnp.ones(n), jnp.zeros(3)])
    on_policy = INPUTS | {"old_logps": INPUTS["logps"]}

    @_jit
    def run(inputs, padded, on_policy):
        cases = {}
        for kind in grpo_losses.LOSSES:
            for parts in (1, 2, 4):
                cases[f"{kind}/{parts}"] = _loss_and_grad(kind, inputs, parts, beta=0.04)
            cases[f"{kind}/padded"] = _loss_and_grad(kind, padded, beta=0.04)
            cases[f"{kind}/on_policy"] = _loss_and_grad(kind, on_policy)
            cases[f"{kind}/old_none"] = _loss_and_grad(kind, inputs, old_logps=None)
        empty = inputs | {"mask": jnp.zeros_like(inputs["mask"])}
        cases["empty"] = _loss_and_grad("grpo", empty)
        return cases

    return run(INPUTS, padded, on_policy)


def _close(ours, theirs) -> bool:
    """Numbers within ATOL, NaN (null in the JSON) matching NaN, recursively."""
    if isinstance(theirs, dict):
        return theirs.keys() == ours.keys() and all(_close(ours[k], theirs[k]) for k in theirs)
    if isinstance(theirs, list):
        return len(ours) == len(theirs) and all(map(_close, ours, theirs))
    if theirs is None or (isinstance(theirs, float) and math.isnan(theirs)):
        return ours is None or (isinstance(ours, float) and math.isnan(ours))
    if isinstance(theirs, str):
        return ours == theirs
    return abs(ours - theirs) <= ATOL


@pytest.mark.parametrize("case", sorted(GOLDEN["advantages"]))
def test_advantages_match_trl(case):
    golden = GOLDEN["advantages"][case]
    rewards = np.array([np.nan if r is None else r for r in golden["rewards"]])
    advantages, metrics = grpo_losses.group_advantages(
        rewards, golden["group_size"], golden["scale"]
    )
    assert advantages.dtype == np.float32
    np.testing.assert_allclose(advantages, golden["advantages"], atol=ATOL, rtol=0)
    assert _close(metrics, golden["metrics"]), (metrics, golden["metrics"])


@pytest.mark.parametrize("case", sorted(GOLDEN["losses"]))
def test_policy_loss_matches_trl(case):
    golden = GOLDEN["losses"][case]
    loss, grad, terms = _trl_cases()[case]
    assert abs(float(loss) - golden["loss"]) <= ATOL
    np.testing.assert_allclose(grad, golden["grad_logps"], atol=ATOL, rtol=0)
    metrics = grpo_losses.report(terms.sums, terms.maxes, terms.mins)
    assert metrics.pop("logprob_diff_max") == pytest.approx(
        np.max(np.abs(INPUTS["logps"] - INPUTS["old_logps"]) * INPUTS["mask"])
    )
    assert _close(metrics, golden["metrics"]), (metrics, golden["metrics"])


def test_golden_regenerates():
    """TRL itself, run now, still gives the committed numbers (skipped without trl)."""
    pytest.importorskip("trl")
    path = os.path.join(GOLDEN_DIR, "make_trl_grpo_golden.py")
    spec = importlib.util.spec_from_file_location("make_trl_grpo_golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.generate()
    fresh.pop("versions")
    golden = {k: v for k, v in GOLDEN.items() if k != "versions"}
    assert _close(fresh, golden)


def _assert_same_terms(ours, theirs):
    np.testing.assert_allclose(ours.weight, theirs.weight, rtol=1e-6)
    for a, b in [(ours.sums, theirs.sums), (ours.maxes, theirs.maxes), (ours.mins, theirs.mins)]:
        assert a.keys() == b.keys()
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


@pytest.mark.parametrize("kind", grpo_losses.LOSSES)
@pytest.mark.parametrize("parts", [2, 4])
def test_micro_batches_add_up(kind, parts):
    """Adding the terms of 2 or 4 micro-batches gives the whole batch's loss and gradient."""
    whole_loss, whole_grad, whole = _property_cases()[f"{kind}/1"]
    loss, grad, terms = _property_cases()[f"{kind}/{parts}"]
    np.testing.assert_allclose(loss, whole_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, whole_grad, rtol=1e-6, atol=1e-9)
    _assert_same_terms(terms, whole)


@pytest.mark.parametrize("kind", grpo_losses.LOSSES)
def test_padding_rows_change_nothing(kind):
    """Rows with row_weight 0 add nothing, even with a nonzero mask and wild values."""
    loss, grad, terms = _property_cases()[f"{kind}/1"]
    padded_loss, padded_grad, padded_terms = _property_cases()[f"{kind}/padded"]
    n = grad.shape[0]
    np.testing.assert_allclose(padded_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(padded_grad[:n], grad, rtol=1e-6, atol=1e-9)
    assert not np.any(padded_grad[n:])
    _assert_same_terms(padded_terms, terms)


def test_on_policy_loss_is_minus_mean_advantage():
    """At ratio 1 and beta 0 the surrogate is -advantage per token, averaged each kind's way."""
    advantages, mask = np.asarray(INPUTS["advantages"]), np.asarray(INPUTS["mask"])
    lengths = mask.sum(1)
    expected = {
        "dapo": -np.sum(advantages * lengths) / lengths.sum(),  # token-weighted
        "grpo": -np.mean(np.where(lengths > 0, advantages, 0.0)),  # an empty row adds 0
        "dr_grpo": -np.sum(advantages * lengths) / (len(lengths) * 8),
    }
    assert GOLDEN["max_completion_length"] == 8
    for kind, value in expected.items():
        for case in ("on_policy", "old_none"):  # old_logps equal to logps, and None
            loss, _, terms = _property_cases()[f"{kind}/{case}"]
            assert float(loss) == pytest.approx(value, abs=1e-7), (kind, case)
            assert float(terms.maxes["logprob_diff_max"]) == 0.0


def test_report_without_completions_is_nan():
    """No completion token: extremes are NaN (TRL's nanmax of nothing), means 0 over 1."""
    terms = _property_cases()["empty"][2]
    metrics = grpo_losses.report(terms.sums, terms.maxes, terms.mins)
    assert math.isnan(metrics["clip_ratio/high_max"]) and math.isnan(metrics["clip_ratio/low_min"])
    assert metrics["logprob_diff_max"] == 0.0 and metrics["entropy"] == 0.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="one of"):
        grpo_losses.group_advantages(np.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_losses.group_advantages(np.zeros(4), 3, "group")
    with pytest.raises(ValueError, match="dapo"):
        _terms("ppo", INPUTS)
    with pytest.raises(ValueError, match="ref_logps"):
        _terms("grpo", INPUTS, beta=0.1, ref_logps=None)


def test_single_completion_groups_have_zero_std():
    """group_size 1 (TRL's eval with one generation): std 0, advantages 0, all zero-std."""
    advantages, metrics = grpo_losses.group_advantages(np.array([1.0, 2.0]), 1, "group")
    np.testing.assert_array_equal(advantages, [0.0, 0.0])
    assert metrics["frac_reward_zero_std"] == 1.0
