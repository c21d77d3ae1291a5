"""TrainState: everything a training step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    """Parameters, optimizer state, the step counter and the run's base PRNG key.

    The model's structure (nnx graphdef) is not part of the state: it is static and is
    bound to the step function once, so the state holds only arrays.
    """

    params: Any  # nnx.State of Params, each tagged with logical axis names
    opt_state: Any  # optax state; its moments keep the Param wrappers and names
    step: jax.Array  # int32 scalar: training steps taken (batches consumed)
    rng: jax.Array  # base key; step n uses fold_in(rng, n), so resuming needs no key history
    skipped: jax.Array  # int32 scalar: steps whose update was dropped for a non-finite loss
