"""Language modelling: next-token cross-entropy on a decoder transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jtrain.models.transformer import Transformer, TransformerConfig
from jtrain.tasks.base import Batch, LossOutput


def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in float32."""
    logits = logits_BxLxV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    return log_z - target_logit


class LMTask:
    """Pretraining and continued pretraining: predict every next token where mask is 1.

    Batch keys: inputs, targets, mask [B, L]; optional positions and segment_ids [B, L]
    for packed rows.
    """

    def __init__(self, model_cfg: TransformerConfig):
        self.model_cfg = model_cfg

    def make_model(self, rngs: nnx.Rngs) -> Transformer:
        return Transformer(self.model_cfg, rngs=rngs)

    def loss(self, model: Transformer, batch: Batch, *, dropout_rng=None) -> LossOutput:
        logits = model(
            batch["inputs"],
            positions_BxL=batch.get("positions"),
            segment_ids_BxL=batch.get("segment_ids"),
            dropout_rng=dropout_rng,
        )
        mask = batch["mask"].astype(jnp.float32)
        nll = token_cross_entropy(logits, batch["targets"])
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        return LossOutput(
            loss_sum=jnp.sum(nll * mask),
            weight=jnp.sum(mask),
            sums={"accuracy": jnp.sum(correct * mask)},
        )

    def flops_per_token(self, seq_len: int, *, weight_grads: bool = True) -> float:
        return self.model_cfg.flops_per_token(seq_len, weight_grads=weight_grads)
