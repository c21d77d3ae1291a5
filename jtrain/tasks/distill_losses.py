"""The distillation loss: alpha * T^2 * KL between the teacher's and the student's softened
distributions plus (1 - alpha) * the hard-label loss, as masked sums over real positions.

MaxText and Tunix average the KL over every position, padding included, so pad tokens pull the
student towards whatever the teacher says there; here a position of weight 0 adds exactly 0,
whatever its logits hold (even inf or NaN), so padding and micro-batching change nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_DIRECTIONS = ("forward", "reverse")


def kl_per_position(
    teacher_logits: jax.Array, student_logits: jax.Array, temperature: float, direction: str
) -> jax.Array:
    """KL over the last axis at `temperature`, in float32: forward is KL(teacher_T || student_T)
    (the student covers every mode of the teacher), reverse is KL(student_T || teacher_T)
    (the student picks the teacher's main mode)."""
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p, log_q = (teacher, student) if direction == "forward" else (student, teacher)
    p = jnp.exp(log_p)
    # p = 0 contributes 0 (a -inf logit would otherwise give 0 * -inf = NaN).
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def masked_sum(values: jax.Array, weight: jax.Array) -> jax.Array:
    """sum(weight * values) over positions of weight > 0 only: a padded position's value
    (garbage logits, NaN) never reaches the sum."""
    weight = weight.astype(jnp.float32)
    return jnp.sum(jnp.where(weight > 0, weight * values, 0.0))


def combined(kl_sum: jax.Array, hard_sum: jax.Array, alpha: float, temperature: float):
    """alpha * T^2 * KL + (1 - alpha) * hard loss (both sums over the same weights). T^2 keeps
    the soft gradients' scale independent of T (Hinton et al., 2015)."""
    return alpha * temperature**2 * kl_sum + (1.0 - alpha) * hard_sum
