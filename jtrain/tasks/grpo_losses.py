"""GRPO's group-relative advantages (host, numpy) and clipped policy loss (JAX), as TRL 1.16's.

`group_advantages` turns a generation batch's rewards into advantages as TRL's
`GRPOTrainer._generate_and_score_completions` does (unscorable NaN rewards included).
`policy_loss` is TRL's `_compute_loss` for the loss types in LOSSES at token-level importance
sampling, written as ADDITIVE terms: a caller adds `PolicyTerms` over micro-batches and devices
and divides once, so any split of a batch gives the same loss and gradient. Its normalisations
equal TRL's when the whole generation batch is one micro-batch; tests/test_grpo_losses.py checks
both against numbers TRL produced (tests/golden/make_trl_grpo_golden.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

LOSSES = ("dapo", "grpo", "dr_grpo")
SCALES = ("group", "batch", "none")
# TRL adds this to the reward std before dividing, so zero-std groups get advantage 0, not NaN.
_STD_EPSILON = 1e-4


def _nan_mean_std(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Bessel-corrected std ignoring NaNs (TRL's nanmean and nanstd): the std is NaN
    where fewer than two values count, the mean where none do."""
    valid = ~np.isnan(x)
    count = valid.sum(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(valid, x, 0.0).sum(axis=axis, keepdims=True) / count
        squares = np.where(valid, (x - mean) ** 2, 0.0).sum(axis=axis, keepdims=True)
        std = np.where(count > 1, np.sqrt(squares / (count - 1)), np.nan)
    return mean, std


def group_advantages(
    rewards: np.ndarray, group_size: int, scale: str
) -> tuple[np.ndarray, dict[str, float]]:
    """Advantages [N] float32 for rewards [N] (a group's completions adjacent), and the reward
    metrics TRL logs: reward (mean), reward_std (std over the batch) and frac_reward_zero_std.

    Each reward minus its group's mean, divided by (std + 1e-4) with std the group's
    (scale='group') or the batch's ('batch'), or not divided ('none'). NaN marks an unscorable
    completion: it is left out of every mean and std, and its advantage is 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    rewards = np.asarray(rewards, np.float64).reshape(-1)
    if group_size < 1 or rewards.size % group_size:
        raise ValueError(
            f"{rewards.size} rewards do not split into groups of {group_size}: pass every "
            "completion of each prompt, the group's completions adjacent"
        )
    group_mean, group_std = _nan_mean_std(rewards.reshape(-1, group_size), axis=1)
    batch_mean, batch_std = _nan_mean_std(rewards, axis=None)
    if scale == "batch":
        std = np.full_like(rewards, batch_std.item() if rewards.size > 1 else 0.0)
    else:  # 'none' divides by nothing, but its std still counts zero-std groups
        std = np.repeat(group_std[:, 0], group_size) if group_size > 1 else np.zeros_like(rewards)
    advantages = rewards - np.repeat(group_mean[:, 0], group_size)
    if scale != "none":
        advantages = advantages / (std + _STD_EPSILON)
    metrics = {
        "reward": batch_mean.item(),
        "reward_std": batch_std.item(),
        # TRL counts rows, not groups, and a NaN std (one scorable completion) is not zero.
        "frac_reward_zero_std": float(np.mean(np.isclose(std, 0.0))),
    }
    return np.nan_to_num(advantages, nan=0.0).astype(np.float32), metrics


@struct.dataclass
class PolicyTerms:
    """Additive parts of the policy loss over some rows: the loss is loss_sum / weight.

    `sums` are token sums, reported by `report` as sums[k] / sums["tokens"] (TRL's
    token-weighted means): kl (when beta > 0), entropy (when given), clip_ratio/low_mean,
    clip_ratio/high_mean, clip_ratio/region_mean. `maxes` and `mins` are extremes, which no sum
    can carry: combine them with max and min (`+` does): logprob_diff_max (the largest
    |logps - old_logps| of a completion token: how far off-policy the batch has drifted),
    clip_ratio/high_max and clip_ratio/low_min (the extreme per-completion clipped fractions).
    """

    loss_sum: jax.Array
    weight: jax.Array
    sums: dict[str, jax.Array]
    maxes: dict[str, jax.Array]
    mins: dict[str, jax.Array]

    def __add__(self, other: PolicyTerms) -> PolicyTerms:
        """Terms of both sets of rows: sums added, extremes combined."""
        return PolicyTerms(
            loss_sum=self.loss_sum + other.loss_sum,
            weight=self.weight + other.weight,
            sums=jax.tree.map(jnp.add, self.sums, other.sums),
            maxes=jax.tree.map(jnp.maximum, self.maxes, other.maxes),
            mins=jax.tree.map(jnp.minimum, self.mins, other.mins),
        )


def _dapo(loss, mask, row_weight, max_completion_length):
    """Every completion token of the batch weighs the same."""
    return jnp.sum(loss * mask), jnp.sum(mask)


def _grpo(loss, mask, row_weight, max_completion_length):
    """Each completion's token mean, then the mean over completions."""
    per_row = jnp.sum(loss * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return jnp.sum(per_row * row_weight), jnp.sum(row_weight)


def _dr_grpo(loss, mask, row_weight, max_completion_length):
    """Token sums over a constant: completions times the longest allowed completion."""
    return jnp.sum(loss * mask), jnp.sum(row_weight) * max_completion_length


# loss kind -> (loss_sum, weight) from the per-token loss, mask [N, T] and row_weight [N]
_NORMALISERS: dict[str, Callable] = {"dapo": _dapo, "grpo": _grpo, "dr_grpo": _dr_grpo}


def _clip_metrics(ratio, bounds, advantages, mask, log_ratio):
    """Token sums and per-completion extremes of where clipping removed the gradient."""
    low = (ratio < bounds[0]) & (advantages < 0)
    high = (ratio > bounds[1]) & (advantages > 0)
    sums = {
        "clip_ratio/low_mean": jnp.sum(low * mask),
        "clip_ratio/high_mean": jnp.sum(high * mask),
        "clip_ratio/region_mean": jnp.sum((low | high) * mask),
    }
    tokens = jnp.sum(mask, axis=1)
    # Completions without tokens have no fraction: TRL's NaN, skipped by its nanmin/nanmax.
    has_tokens = tokens > 0
    fraction = lambda x: jnp.sum(x * mask, axis=1) / jnp.maximum(tokens, 1.0)  # noqa: E731
    maxes = {
        "logprob_diff_max": jnp.max(jnp.abs(log_ratio) * mask, initial=0.0),
        "clip_ratio/high_max": jnp.max(jnp.where(has_tokens, fraction(high), -jnp.inf)),
    }
    mins = {"clip_ratio/low_min": jnp.min(jnp.where(has_tokens, fraction(low), jnp.inf))}
    return sums, maxes, mins


def policy_loss(
    kind: str,
    logps: jax.Array,
    old_logps: jax.Array | None,
    ref_logps: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    epsilon: float,
    epsilon_high: float,
    beta: float,
    max_completion_length: int,
    row_weight: jax.Array | None = None,
    entropy: jax.Array | None = None,
    bias_correction_kl: bool = True,
) -> PolicyTerms:
    """TRL's clipped surrogate plus beta * k3 KL to the reference, as additive `PolicyTerms`.

    logps, old_logps, ref_logps, entropy, mask: [N, T] over completion tokens; advantages and
    row_weight (1 a real completion, 0 a padding row; default all 1): [N]. The ratio
    exp(logps - old_logps) is clipped to [1 - epsilon, 1 + epsilon_high]. old_logps None means
    on-policy (one update per generation): stop_gradient(logps), as TRL does. ref_logps may be
    None only when beta == 0; entropy (the policy's, for the metric) may be None.
    bias_correction_kl (TRL's use_bias_correction_kl, on by default there too) multiplies the k3
    KL by the unclipped ratio, which makes its gradient the unbiased reverse-KL gradient off
    policy and still changes the gradient on policy, where the ratio's value is 1.
    """
    if kind not in _NORMALISERS:
        raise ValueError(f"GRPO loss must be one of {LOSSES}, got {kind!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps, the reference model's per-token log-probs")
    logps = logps.astype(jnp.float32)
    old_logps = jax.lax.stop_gradient(logps) if old_logps is None else old_logps
    old_logps = old_logps.astype(jnp.float32)
    if row_weight is None:
        row_weight = jnp.ones(logps.shape[0], jnp.float32)
    row_weight = row_weight.astype(jnp.float32)
    # Padding rows weigh nothing, whatever their mask says.
    mask = mask.astype(jnp.float32) * row_weight[:, None]
    advantages = advantages.astype(jnp.float32)[:, None]
    bounds = (1.0 - epsilon, 1.0 + epsilon_high)

    log_ratio = logps - old_logps
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, *bounds)
    loss = -jnp.minimum(ratio * advantages, clipped * advantages)
    sums, maxes, mins = _clip_metrics(ratio, bounds, advantages, mask, log_ratio)
    if beta != 0.0:
        ref_minus_policy = ref_logps.astype(jnp.float32) - logps
        kl = jnp.exp(ref_minus_policy) - ref_minus_policy - 1.0
        if bias_correction_kl:
            kl = kl * ratio
        loss = loss + beta * kl
        sums["kl"] = jnp.sum(kl * mask)
    if entropy is not None:
        sums["entropy"] = jnp.sum(entropy.astype(jnp.float32) * mask)
    sums["tokens"] = jnp.sum(mask)
    loss_sum, weight = _NORMALISERS[kind](loss, mask, row_weight, max_completion_length)
    return PolicyTerms(loss_sum=loss_sum, weight=weight, sums=sums, maxes=maxes, mins=mins)


def _finite(value) -> float:
    """An extreme over no completion (±inf) is NaN, as TRL's nanmax of nothing."""
    value = float(value)
    return value if math.isfinite(value) else math.nan


def report(
    sums: Mapping[str, float],
    maxes: Mapping[str, float] | None = None,
    mins: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Reported metrics from summed (and max/min-combined) terms, as host floats."""
    tokens = max(float(sums["tokens"]), 1.0)
    metrics = {name: float(value) / tokens for name, value in sums.items() if name != "tokens"}
    for extremes in (maxes or {}, mins or {}):
        metrics.update({name: _finite(value) for name, value in extremes.items()})
    return metrics
