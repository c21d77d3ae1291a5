"""Per-token values of a language model's logits, without the whole batch's logits at once.

A loss reads a few numbers per token (the target's log-probability, whether the argmax is
right, an entropy) from logits of [batch, length, vocab] float32 values: 4 GiB for a batch of
8 x 2048 tokens over Llama 3's 128,256-token vocabulary, and as much again for their gradient.
`per_token` runs the head on `model.loss_chunk` positions at a time instead, inside a
`lax.map` whose body is rematerialised, so the forward pass keeps only the per-token values and
the backward pass recomputes each chunk's logits when it reaches it: one chunk's logits exist
at any time. Each token's values are computed as before (the same matmul row, the same
float32 softmax), so losses and gradients agree with the unchunked ones to rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# fn(logits [B, C, V] float32, targets [B, C]) -> a tuple of per-token arrays [B, C].
PerTokenFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]]


def per_token(
    model, tokens_BxL: jax.Array, targets_BxL: jax.Array, fn: PerTokenFn, **trunk_options
) -> tuple[jax.Array, ...]:
    """fn of the model's next-token logits, chunked over positions when the model asks.

    A model with a positive `loss_chunk` attribute (the transformer's `model.loss_chunk`) must
    offer `hidden(tokens, **trunk_options)` and `logits(hidden)`; any other model is called
    whole, `model(tokens, **trunk_options)`.
    """
    chunk = getattr(model, "loss_chunk", 0)
    if not chunk or chunk >= tokens_BxL.shape[1]:
        return fn(model(tokens_BxL, **trunk_options), targets_BxL)
    hidden_BxLxD = model.hidden(tokens_BxL, **trunk_options)
    return chunked(model.logits, hidden_BxLxD, targets_BxL, fn, chunk)


def chunked(
    head: Callable[[jax.Array], jax.Array],
    hidden_BxLxD: jax.Array,
    targets_BxL: jax.Array,
    fn: PerTokenFn,
    chunk: int,
) -> tuple[jax.Array, ...]:
    """fn(head(hidden), targets) computed `chunk` positions at a time; [B, L] arrays out.

    Chunks run along the sequence, not the flattened tokens, so each keeps the batch axis and
    with it the batch's sharding over the data axes. A length that is not a multiple of the
    chunk is padded with zeros for the last chunk; the padded positions are cut off after.
    """
    batch, length, width = hidden_BxLxD.shape
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        hidden_BxLxD = jnp.pad(hidden_BxLxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
    hidden_NxBxCxD = jnp.moveaxis(hidden_BxLxD.reshape(batch, n_chunks, chunk, width), 1, 0)
    targets_NxBxC = jnp.moveaxis(targets_BxL.reshape(batch, n_chunks, chunk), 1, 0)

    # Nothing inside is saved for the backward pass: it recomputes this chunk's logits.
    @jax.checkpoint
    def one_chunk(args):
        h_BxCxD, t_BxC = args
        return tuple(fn(head(h_BxCxD), t_BxC))

    outputs = jax.lax.map(one_chunk, (hidden_NxBxCxD, targets_NxBxC))
    return tuple(
        jnp.moveaxis(out_NxBxC, 0, 1).reshape(batch, n_chunks * chunk)[:, :length]
        for out_NxBxC in outputs
    )
