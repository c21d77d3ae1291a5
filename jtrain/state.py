"""TrainState: everything a training step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx, struct

BASE = "base"  # the name of the trained model's own frozen part in TrainState.frozen


@struct.dataclass
class TrainState:
    """Trainable and frozen parameters, optimizer state, the step counter and the base PRNG key.

    The model's structure (nnx graphdef) is not part of the state: it is static and is
    bound to the step function once, so the state holds only arrays.
    """

    params: Any  # nnx.State of the trained Params, each tagged with logical axis names
    opt_state: Any  # optax state; its moments keep the Param wrappers and names
    step: jax.Array  # int32 scalar: training steps taken (batches consumed)
    rng: jax.Array  # base key; step n uses fold_in(rng, n), so resuming needs no key history
    skipped: jax.Array  # int32 scalar: steps whose update was dropped for a non-finite loss
    # What gets no gradients, by name: "base" is the trained model's frozen rest (a LoRA run's
    # base; empty when every parameter trains), the other names are the task's frozen models
    # (a reference, a teacher). Never checkpointed: rebuilt from where they were loaded.
    frozen: dict[str, Any] | None = None

    @property
    def model_params(self) -> nnx.State:
        """Every variable of the trained model, trained and frozen: for evaluation, sampling."""
        if not self.frozen:
            return self.params
        return nnx.merge_state(self.params, self.frozen[BASE])

    def checkpointed(self) -> TrainState:
        """The part of the state that checkpoints hold: all but the frozen parts."""
        return self.replace(frozen=None)
