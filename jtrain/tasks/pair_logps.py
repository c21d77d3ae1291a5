"""A pair batch's sequences and their log-probabilities: what DPO, its precomputed reference
and reward models share. Rows [B, 2, ...] hold each pair's chosen and rejected sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jtrain.models import lm_head
from jtrain.tasks.lm import token_cross_entropy


def sequence_logps(model, tokens_NxL1, completion_NxL1, *, dropout_rng=None):
    """(sum of log p over each sequence's completion tokens [N], completion tokens [N])."""
    inputs, targets = tokens_NxL1[:, :-1], tokens_NxL1[:, 1:]
    [logps] = lm_head.per_token(model, inputs, targets, _logps, dropout_rng=dropout_rng)
    weight = completion_NxL1[:, 1:]
    return jnp.sum(logps * weight, axis=-1), jnp.sum(weight, axis=-1)


def _logps(logits, targets):
    return (-token_cross_entropy(logits, targets),)


def pair_rows(batch, name: str) -> jax.Array:
    """[B, 2, ...] -> [2B, ...]: rows 2i and 2i + 1 are pair i's chosen and rejected."""
    x = batch[name]
    return x.reshape(-1, *x.shape[2:])
