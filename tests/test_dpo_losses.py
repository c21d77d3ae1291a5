"""jtrain.tasks.dpo_losses against TRL 1.16: golden numbers that TRL's own trainers produced
(tests/golden/trl_dpo.json, written by tests/golden/make_trl_dpo_golden.py), and the losses'
known values at policy == reference."""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain.tasks import dpo_losses
from jtrain.tasks.dpo_losses import LOSSES, REFERENCE_FREE, PairLogps, pair_losses

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
GOLDEN = os.path.join(GOLDEN_DIR, "trl_dpo.json")
METRICS = dpo_losses.METRICS
TOL = 1e-5


def _golden() -> dict:
    with open(GOLDEN) as f:
        return json.load(f)


CASES = _golden()["cases"]


def _pairs(inputs: dict) -> PairLogps:
    return PairLogps(**{k: jnp.asarray(v, jnp.float32) for k, v in inputs.items()})


def _run(case: dict):
    return pair_losses(
        case["kind"],
        _pairs(case["inputs"]),
        beta=case["beta"],
        label_smoothing=case["label_smoothing"],
        gamma=case["gamma"],
        sft_weight=case["sft_weight"],
    )


def _close(ours, trl, what: str) -> None:
    ours = float(ours)
    assert abs(ours - trl) <= TOL * max(1.0, abs(trl)), f"{what}: jtrain {ours!r}, TRL {trl!r}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_trl(case):
    loss, metrics = _run(case)
    trl = case["trl"]
    assert loss.shape == (4,) and loss.dtype == jnp.float32
    if case["loss_without_nll"]:
        # TRL's ORPO NLL also counts prompt tokens; the odds-ratio part must still agree.
        chosen_nll = -np.mean(np.divide(case["inputs"]["chosen"], case["inputs"]["chosen_tokens"]))
        _close(jnp.mean(loss) - chosen_nll, trl["loss"] - trl["nll_loss"], "loss without NLL")
    else:
        _close(jnp.mean(loss), trl["loss"], "loss")
    assert sorted(metrics) == sorted(METRICS)
    for name in METRICS:
        assert metrics[name].shape == (4,), name
        _close(jnp.mean(metrics[name]), trl[name], name)


def test_golden_covers_every_loss():
    assert {c["kind"] for c in CASES} == set(LOSSES)
    assert any(c["sft_weight"] and c["kind"] not in REFERENCE_FREE for c in CASES)
    assert any(c["sft_weight"] and c["kind"] == "simpo" for c in CASES)


def test_generator_reproduces_golden():
    """The generator, re-run with this TRL, gives the committed numbers."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    if trl.__version__ != _golden()["versions"]["trl"]:
        pytest.skip(f"golden numbers are from trl {_golden()['versions']['trl']}")
    path = os.path.join(GOLDEN_DIR, "make_trl_dpo_golden.py")
    spec = importlib.util.spec_from_file_location("make_trl_dpo_golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.build_golden()["cases"]
    assert [c["name"] for c in fresh] == [c["name"] for c in CASES]
    for new, old in zip(fresh, CASES, strict=True):
        for section in ("inputs", "trl"):
            for key, value in old[section].items():
                np.testing.assert_allclose(new[section][key], value, rtol=1e-6, atol=1e-6)


def _golden_pairs() -> PairLogps:
    """The pairs of the first golden sigmoid case (with reference log-probs)."""
    return _pairs(next(c for c in CASES if c["kind"] == "sigmoid")["inputs"])


def _equal_policy(batch: int = 5) -> PairLogps:
    """Policy == reference: random sums and lengths, the reference copying the policy."""
    rng = np.random.default_rng(0)
    chosen, rejected = (jnp.asarray(-rng.uniform(1, 40, batch), jnp.float32) for _ in range(2))
    lengths = (jnp.asarray(rng.integers(1, 20, batch), jnp.float32) for _ in range(2))
    return PairLogps(chosen, rejected, *lengths, ref_chosen=chosen, ref_rejected=rejected)


def test_sigmoid_at_reference_is_ln2():
    loss, metrics = pair_losses("sigmoid", _equal_policy(), beta=0.1)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    np.testing.assert_array_equal(metrics["rewards/accuracies"], 0.0)
    np.testing.assert_array_equal(metrics["rewards/margins"], 0.0)


def test_hinge_at_reference_is_one():
    loss, _ = pair_losses("hinge", _equal_policy(), beta=0.3)
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)


def test_robust_without_smoothing_is_sigmoid():
    logps = _golden_pairs()
    robust, robust_metrics = pair_losses("robust", logps, beta=0.2, label_smoothing=0.0)
    sigmoid, sigmoid_metrics = pair_losses("sigmoid", logps, beta=0.2)
    np.testing.assert_allclose(robust, sigmoid, rtol=1e-6)
    for name in METRICS:
        np.testing.assert_array_equal(robust_metrics[name], sigmoid_metrics[name])


def test_sft_weight_adds_chosen_mean_nll_per_pair():
    logps = _golden_pairs()
    base, _ = pair_losses("ipo", logps, beta=0.5)
    with_sft, _ = pair_losses("ipo", logps, beta=0.5, sft_weight=0.25)
    nll = -logps.chosen / logps.chosen_tokens
    np.testing.assert_allclose(with_sft - base, 0.25 * nll, rtol=1e-5)


@pytest.mark.parametrize("kind", LOSSES)
def test_padding_pairs_are_finite(kind):
    """A pair with no tokens (a padding row) has finite values and gradients, for the caller
    to mask: a NaN there would survive a multiplication by zero."""
    zeros = jnp.zeros((2,), jnp.float32)
    logps = PairLogps(zeros, zeros, zeros, zeros, zeros, zeros)

    def total(p):
        return jnp.sum(pair_losses(kind, p, beta=0.1, label_smoothing=0.1, gamma=0.5)[0])

    loss, metrics = pair_losses(kind, logps, beta=0.1, label_smoothing=0.1, gamma=0.5)
    assert np.isfinite(loss).all()
    assert all(np.isfinite(v).all() for v in metrics.values())
    grads = jax.grad(total)(logps)
    assert np.isfinite(grads.chosen).all() and np.isfinite(grads.rejected).all()


def test_log1mexp_both_branches():
    x = jnp.asarray([-30.0, -5.0, -0.7, -0.69, -0.1, -1e-4], jnp.float32)
    x64 = np.asarray(x, np.float64)
    # Each branch is exact in float64 only on its own side of -ln 2.
    expected = np.where(x64 < -0.69315, np.log1p(-np.exp(x64)), np.log(-np.expm1(x64)))
    np.testing.assert_allclose(dpo_losses._log1mexp(x), expected, rtol=1e-6)


def test_orpo_matches_formula_near_certain_completions():
    """ORPO with average log-probs above -ln 2, where log(1 - p) needs expm1; float64 check."""
    chosen, rejected = np.asarray([-0.05, -0.3]), np.asarray([-0.6, -0.01])
    tokens = np.asarray([4.0, 2.0])
    logps = PairLogps(
        *(jnp.asarray(v, jnp.float32) for v in (chosen * tokens, rejected * tokens)),
        jnp.asarray(tokens, jnp.float32),
        jnp.asarray(tokens, jnp.float32),
    )
    loss, _ = pair_losses("orpo", logps, beta=0.5)
    log_odds = chosen - rejected - (np.log(-np.expm1(chosen)) - np.log(-np.expm1(rejected)))
    expected = -chosen + 0.5 * np.log1p(np.exp(-log_odds))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_jit_and_grad():
    """The losses trace under jit, with PairLogps as an argument, and have finite gradients."""
    logps = _golden_pairs()
    free = PairLogps(logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens)
    for kind in LOSSES:
        pairs = free if kind in REFERENCE_FREE else logps

        def total(p, kind=kind):
            return jnp.sum(pair_losses(kind, p, beta=0.1, label_smoothing=0.1)[0])

        grads = jax.jit(jax.grad(total))(pairs)
        assert np.isfinite(grads.chosen).all() and np.isfinite(grads.rejected).all(), kind


def test_errors():
    logps = _golden_pairs()
    with pytest.raises(ValueError, match="allowed: sigmoid"):
        pair_losses("kto", logps, beta=0.1)
    free = PairLogps(logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens)
    with pytest.raises(ValueError, match="reference model"):
        pair_losses("sigmoid", free, beta=0.1)
    with pytest.raises(ValueError, match="sft_weight"):
        pair_losses("orpo", free, beta=0.1, sft_weight=0.5)
