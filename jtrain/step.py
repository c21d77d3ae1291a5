"""Pure train and eval steps, generic over a Task, and their one-time jit with shardings.

`train_step(state, batch) -> (state, metrics)` has no side effects: the model structures,
the task and the optimizer are bound as keywords before jit, so only arrays are traced.
Gradients are taken of `state.params` only; `state.frozen` (the trained model's frozen base,
and the task's frozen models) passes through unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jtrain.state import BASE, TrainState
from jtrain.tasks.base import Batch, LossOutput, Task


@dataclasses.dataclass(frozen=True)
class Structure:
    """The static graph definitions: the trained model's and each frozen model's."""

    trained: nnx.GraphDef
    frozen: Mapping[str, nnx.GraphDef]

    def models(self, params, frozen) -> tuple[nnx.Module, dict[str, nnx.Module]]:
        """(the trained model, the frozen models by name) from their states."""
        model = nnx.merge(self.trained, params, frozen[BASE])
        return model, {name: nnx.merge(g, frozen[name]) for name, g in self.frozen.items()}


def _loss_and_grads(params, frozen, batch: Batch, rng, *, structure: Structure, task: Task):
    """Gradient of the summed loss (not the mean), so micro-batches add up exactly."""

    def loss_fn(p):
        model, frozen_models = structure.models(p, frozen)
        out = task.loss(model, batch, dropout_rng=rng, frozen=frozen_models).summed()
        return out.loss_sum, out

    grads, out = jax.grad(loss_fn, has_aux=True)(params)
    return grads, out


def _split_microbatches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...], micro-batch i taking rows i, i+k, ...

    Splitting rows this way keeps each device's rows on that device: the leading (sharded)
    batch dimension is only relabelled, never moved.
    """

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    structure: Structure,
    task: Task,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    microbatches: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the mean loss of the batch, accumulated over micro-batches."""
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = functools.partial(_loss_and_grads, structure=structure, task=task)
    if microbatches == 1:
        grads, out = grad_fn(state.params, state.frozen, batch, rng)
    else:

        def accumulate(carry, xs):
            micro, i = xs
            g, o = grad_fn(state.params, state.frozen, micro, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (g, o)), None

        micro_batches = _split_microbatches(batch, microbatches)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(grad_fn, state.params, state.frozen, first, rng)
        zeros = jax.tree.map(jnp.zeros_like, shapes)
        (grads, out), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(microbatches)))

    weight = jnp.maximum(out.weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss, grad_norm = out.loss_sum / weight, optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient must not reach the weights: keep the old params and
    # optimizer state, and count the step. The loop then halts or goes on, by policy.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = state.replace(
        params=keep_if_finite(params, state.params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        step=state.step + 1,
        skipped=state.skipped + jnp.where(finite, 0, 1).astype(state.skipped.dtype),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        # The optimizer's own count skips dropped updates, so this is the rate it applied.
        "lr": schedule(state.step - state.skipped),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
        "totals": out,  # the task turns these into its reported metrics
    }
    return new_state, metrics


def eval_step(params, frozen, batch: Batch, *, structure: Structure, task: Task) -> LossOutput:
    """Loss and metric sums over one batch, without dropout; the caller adds them up."""
    model, frozen_models = structure.models(params, frozen)
    return task.loss(model, batch, dropout_rng=None, frozen=frozen_models)


def jit_train_step(
    *, structure, task, tx, schedule, microbatches: int, state_shardings, batch_sharding
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """train_step compiled once: state in and out with its shardings, and donated.

    Donation also covers the frozen parts: XLA aliases them from input to output, so passing
    them through costs no copy (without donation they would be copied every step).
    """
    step = functools.partial(
        train_step,
        structure=structure,
        task=task,
        tx=tx,
        schedule=schedule,
        microbatches=microbatches,
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnames="state",
    )


def jit_eval_step(*, structure, task, state_shardings, batch_sharding):
    """eval_step compiled once for fixed-shape eval batches."""
    step = functools.partial(eval_step, structure=structure, task=task)
    shardings = (state_shardings.params, state_shardings.frozen, batch_sharding)
    return jax.jit(step, in_shardings=shardings)
