"""Sampling text from a trained language model.

A fixed-size token window keeps every call the same shape, so the next-token function
compiles once; this is for showing a sample at the end of a run, not for serving.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature"))
def _next_token(params, window_1xL, length, rng, *, graphdef, temperature: float):
    logits_V = nnx.merge(graphdef, params)(window_1xL)[0, length - 1]
    if temperature == 0.0:
        return jnp.argmax(logits_V)
    return jax.random.categorical(rng, logits_V / temperature)


def sample(
    model: nnx.Module,
    prompt_ids: np.ndarray,
    *,
    max_new_tokens: int,
    window: int,
    stop_id: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Extends prompt_ids by up to max_new_tokens; greedy when temperature is 0."""
    graphdef, params = nnx.split(model)
    tokens = [int(t) for t in prompt_ids]
    rng = jax.random.key(seed)
    for i in range(max_new_tokens):
        context = tokens[-window:]
        window_1xL = np.zeros((1, window), np.int32)
        window_1xL[0, : len(context)] = context
        token = int(
            _next_token(
                params,
                window_1xL,
                len(context),
                jax.random.fold_in(rng, i),
                graphdef=graphdef,
                temperature=float(temperature),
            )
        )
        if token == stop_id:
            break
        tokens.append(token)
    return np.asarray(tokens[len(prompt_ids) :], np.int32)
