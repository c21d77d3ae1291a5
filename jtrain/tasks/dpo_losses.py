"""Preference-tuning losses on per-pair log-probabilities, equal to TRL 1.16's.

A pair is a prompt with a chosen and a rejected completion; the model side (forward passes,
masking, summing token log-probs) belongs to the DPO task. Here each loss maps the summed
log-probs of a pair to a per-pair loss and per-pair metrics, so the caller can sum them over
micro-batches and divide by the number of real pairs: a TRL batch value is the mean over pairs.

Reference-based kinds follow `trl.DPOTrainer` (reverse-KL f-divergence): `sigmoid` (DPO),
`hinge` (SLiC), `ipo` (length-normalised, as TRL does) and `robust`. Reference-free kinds
follow TRL's experimental trainers: `simpo` (`CPOTrainer`, `loss_type="simpo"`) and `orpo`
(`ORPOTrainer`); both score a completion by its average token log-prob.

`sft_weight` adds the chosen completion's mean token NLL (RPO; TRL's `"sft"` loss term or
CPO's `cpo_alpha`). TRL averages that term over all chosen tokens of the batch; here it is
averaged per pair, because a batch-wide token mean changes with the micro-batch split. The two
agree when every chosen completion in the batch has the same number of tokens. ORPO's own NLL
is treated the same way, and also leaves out the prompt tokens that TRL's ORPO counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
# The per-pair metrics every loss reports, with TRL's names.
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs of each pair, float32 [B]; `ref_*` None when reference-free."""

    chosen: jax.Array  # sum over the chosen completion's tokens of log p(token)
    rejected: jax.Array
    chosen_tokens: jax.Array  # number of completion tokens (float)
    rejected_tokens: jax.Array
    ref_chosen: jax.Array | None = None  # the same sums under the reference model
    ref_rejected: jax.Array | None = None


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _average(logps_sum: jax.Array, tokens: jax.Array) -> jax.Array:
    # At least one token, as TRL's IPO clamps: a padding pair (no tokens) must give 0, not NaN.
    return _f32(logps_sum) / jnp.maximum(_f32(tokens), 1.0)


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 as TRL's ORPO does (no cancellation)."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _smoothed_sigmoid(logits: jax.Array, label_smoothing: float) -> jax.Array:
    """-log σ(z) with the label flipped with probability `label_smoothing` (cDPO, CPO)."""
    return (
        -jax.nn.log_sigmoid(logits) * (1 - label_smoothing)
        - jax.nn.log_sigmoid(-logits) * label_smoothing
    )


def _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
    }


# Reference-based terms: (log-ratios chosen, rejected, the pairs, beta, label_smoothing) -> [B].
_Term = Callable[[jax.Array, jax.Array, PairLogps, float, float], jax.Array]


def _sigmoid(chosen, rejected, logps, beta, label_smoothing):
    return -jax.nn.log_sigmoid(beta * (chosen - rejected))


def _hinge(chosen, rejected, logps, beta, label_smoothing):
    return jax.nn.relu(1 - beta * (chosen - rejected))


def _ipo(chosen, rejected, logps, beta, label_smoothing):
    # TRL normalises IPO's log-ratios by completion length (per token), so beta is length-free.
    delta = _average(chosen, logps.chosen_tokens) - _average(rejected, logps.rejected_tokens)
    return (delta - 1 / (2 * beta)) ** 2


def _robust(chosen, rejected, logps, beta, label_smoothing):
    # Unbiased under labels flipped with probability label_smoothing (Chowdhury et al., 2024).
    logits = beta * (chosen - rejected)
    clean = -(1 - label_smoothing) * jax.nn.log_sigmoid(logits)
    flipped = -label_smoothing * jax.nn.log_sigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


_REFERENCE_TERMS: dict[str, _Term] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "robust": _robust,
}


def _reference_losses(kind, logps, *, beta, label_smoothing, gamma, sft_weight):
    """DPOTrainer's loss of `kind`, rewards beta * log-ratio, logps the sums."""
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError(
            f"the {kind!r} preference loss needs the reference model's log-probs "
            "(ref_chosen, ref_rejected); use a reference-free loss "
            f"({', '.join(REFERENCE_FREE)}) to train without one."
        )
    chosen, rejected = _f32(logps.chosen), _f32(logps.rejected)
    chosen_ratio = chosen - _f32(logps.ref_chosen)
    rejected_ratio = rejected - _f32(logps.ref_rejected)
    loss = _REFERENCE_TERMS[kind](chosen_ratio, rejected_ratio, logps, beta, label_smoothing)
    loss = loss - sft_weight * _average(chosen, logps.chosen_tokens)
    metrics = _metrics(beta * chosen_ratio, beta * rejected_ratio, chosen, rejected)
    return loss, metrics


def _simpo(kind, logps, *, beta, label_smoothing, gamma, sft_weight):
    """CPOTrainer's SimPO: margin gamma on beta * average log-probs, no reference."""
    chosen = _average(logps.chosen, logps.chosen_tokens)
    rejected = _average(logps.rejected, logps.rejected_tokens)
    # As TRL writes it: beta * (delta - gamma / beta), i.e. beta * delta - gamma.
    logits = (chosen - rejected) - gamma / beta
    loss = _smoothed_sigmoid(beta * logits, label_smoothing) - sft_weight * chosen
    return loss, _metrics(beta * chosen, beta * rejected, chosen, rejected)


def _orpo(kind, logps, *, beta, label_smoothing, gamma, sft_weight):
    """ORPOTrainer's loss: chosen NLL minus beta * log σ(log odds ratio) of average log-probs."""
    if sft_weight:
        raise ValueError(
            "orpo already adds the chosen completion's NLL with weight 1; set sft_weight to 0 "
            "(beta weighs the odds-ratio term against it)."
        )
    chosen = _average(logps.chosen, logps.chosen_tokens)
    rejected = _average(logps.rejected, logps.rejected_tokens)
    # A padding pair (no tokens) averages to log p = 0, where log(1 - p) is -inf and its
    # gradient NaN even when masked later; give it a finite stand-in. Real pairs are unchanged.
    real = (_f32(logps.chosen_tokens) > 0) & (_f32(logps.rejected_tokens) > 0)
    log1m_chosen = _log1mexp(jnp.where(real, chosen, -1.0))
    log1m_rejected = _log1mexp(jnp.where(real, rejected, -1.0))
    log_odds = (chosen - rejected) - (log1m_chosen - log1m_rejected)
    loss = -chosen - beta * jax.nn.log_sigmoid(log_odds)
    return loss, _metrics(beta * chosen, beta * rejected, chosen, rejected)


_KINDS = {
    **{kind: _reference_losses for kind in _REFERENCE_TERMS},
    "simpo": _simpo,
    "orpo": _orpo,
}


def pair_losses(
    kind: str,
    logps: PairLogps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    sft_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair loss [B] and per-pair metrics [B] (TRL's names) of preference loss `kind`.

    Metrics: rewards/{chosen,rejected,margins,accuracies} and logps/{chosen,rejected}. For
    the reference-based kinds the rewards are beta * (policy - reference) summed log-probs and
    logps/* are the sums (DPOTrainer); for simpo and orpo the rewards are beta * average
    token log-probs and logps/* are those averages (CPOTrainer, ORPOTrainer). TRL's batch
    value of each is the mean over pairs.

    `label_smoothing` is used by robust (flip rate, in [0, 0.5)) and simpo (as CPO's); sigmoid,
    hinge and ipo ignore it, as TRL 1.16's DPOTrainer does. `gamma` is SimPO's target margin.
    `sft_weight` adds sft_weight * the chosen completion's mean token NLL per pair (RPO). TRL
    averages that term over all chosen tokens of the batch instead, which changes with the
    micro-batch split; the two agree when all chosen completions have the same length.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown preference loss {kind!r}: allowed: {', '.join(LOSSES)}.")
    return _KINDS[kind](
        kind,
        logps,
        beta=beta,
        label_smoothing=label_smoothing,
        gamma=gamma,
        sft_weight=sft_weight,
    )
