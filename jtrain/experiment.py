"""Everything a run is built from, derived once from the config: mesh, task, optimizer,
shardings and the compiled steps. Usable on its own from a notebook or a test.

The split of the model into trained and frozen parameters is decided here, once, by a filter
(`model.lora`: adapters train, the base is frozen; without LoRA everything trains); the
step, the loop and checkpointing handle both alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jtrain import mesh as mesh_lib
from jtrain import optim, pretrained, step, tasks
from jtrain.config import ConfigError
from jtrain.models import lora
from jtrain.state import TrainState


@dataclasses.dataclass
class Experiment:
    """The static pieces of a run; the only changing thing, the TrainState, lives outside."""

    config: object
    mesh: Mesh
    task: tasks.Task
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    graphdef: nnx.GraphDef
    abstract_state: TrainState  # shapes and dtypes only
    state_shardings: TrainState
    abstract_base: nnx.State  # the task model's own params, sharded: what init_from loads
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable
    _init_fn: Callable

    @classmethod
    def from_config(
        cls,
        config,
        devices: Sequence[jax.Device] | None = None,
        *,
        task: tasks.Task | None = None,
    ) -> Experiment:
        """Builds the mesh and shardings and jits the steps (compilation happens on first use).

        `task` replaces the one `config.task` names (a custom objective from a notebook).
        """
        mesh = mesh_lib.make_mesh(config.mesh, devices)
        rules = mesh_lib.parse_rules(config.mesh.rules)
        _check_batch_divides(config, mesh_lib.batch_shards(mesh, rules))
        task = tasks.get(config) if task is None else task
        tx, schedule = optim.make_optimizer(config.optimizer, config.schedule, config.train.steps)
        make_model, init_fn = _initializers(task, tx, lora.LoRAConfig.from_config(config.model))
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))))
        abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
        state_shardings = mesh_lib.tree_shardings(abstract_state, mesh, rules)
        base = nnx.state(nnx.eval_shape(lambda: task.make_model(nnx.Rngs(0))), nnx.Param)
        abstract_base = _with_shardings(base, mesh_lib.tree_shardings(base, mesh, rules))
        batch_sharding = mesh_lib.batch_sharding(mesh, rules)
        return cls(
            config=config,
            mesh=mesh,
            task=task,
            tx=tx,
            schedule=schedule,
            graphdef=graphdef,
            abstract_state=abstract_state,
            state_shardings=state_shardings,
            abstract_base=abstract_base,
            batch_sharding=batch_sharding,
            train_step=step.jit_train_step(
                graphdef=graphdef,
                task=task,
                tx=tx,
                schedule=schedule,
                microbatches=config.train.microbatches,
                state_shardings=state_shardings,
                batch_sharding=batch_sharding,
            ),
            eval_step=step.jit_eval_step(
                graphdef=graphdef,
                task=task,
                params_shardings=state_shardings.model_params,
                batch_sharding=batch_sharding,
            ),
            _init_fn=init_fn,
        )

    def abstract_sharded_state(self) -> TrainState:
        """Shapes, dtypes and target shardings of the state: what a restore fills in."""
        return _with_shardings(self.abstract_state, self.state_shardings)

    def init_state(self, seed: int | None = None, *, base: nnx.State | None = None) -> TrainState:
        """A fresh TrainState, created directly in its sharded placement.

        `base` (shaped like `abstract_base`, e.g. from jtrain.pretrained.load) replaces the
        model's initial parameters; adapters start fresh. Its buffers are donated.
        """
        seed = self.config.seed if seed is None else seed
        init = jax.jit(self._init_fn, out_shardings=self.state_shardings, donate_argnames="base")
        return init(jax.random.key(seed), base)

    def init_frozen(self, seed: int | None = None, *, base: nnx.State | None = None):
        """`init_state(seed, base=base).frozen` alone: how a resumed run rebuilds its base."""
        seed = self.config.seed if seed is None else seed

        def frozen(rng, base):
            return self._init_fn(rng, base).frozen

        init = jax.jit(frozen, out_shardings=self.state_shardings.frozen, donate_argnames="base")
        return init(jax.random.key(seed), base)

    def rebuild_frozen(self):
        """The frozen part of the state as the run first built it, for a resume or an export:
        from model.init_from (only read for a LoRA run, whose checkpoints lack the base), else
        from the seed."""
        init_from = self.config.model.init_from
        if not (init_from and self.has_frozen()):
            return self.init_frozen()
        return self.init_frozen(base=pretrained.load(init_from, self.abstract_base))

    def has_frozen(self) -> bool:
        """True when part of the model is frozen (LoRA), so checkpoints do not hold all of it."""
        return bool(jax.tree.leaves(self.abstract_state.frozen))

    def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes."""
        return mesh_lib.to_global_batch(local_batch, self.batch_sharding)

    def evaluate(self, params, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
        """Token-weighted loss, perplexity and metrics over every batch of an eval split."""
        total = None
        for local_batch in batches:
            out = self.eval_step(params, self.global_batch(local_batch))
            total = out if total is None else total + out
        if total is None:
            raise ValueError("the evaluation split produced no batches")
        total = jax.device_get(total)
        weight = max(float(total.weight), 1.0)
        loss = float(total.loss_sum) / weight
        metrics = {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}
        metrics.update({name: float(v) / weight for name, v in total.sums.items()})
        metrics["tokens"] = float(total.weight)
        return metrics

    def param_count(self) -> int:
        """Number of trainable parameters."""
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(self.abstract_state.params))

    def frozen_count(self) -> int:
        """Number of frozen values (a LoRA run's base; int8 scales included)."""
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(self.abstract_state.frozen))


def _initializers(task: tasks.Task, tx: optax.GradientTransformation, lora_cfg: lora.LoRAConfig):
    """(make_model, init_fn): the model (pre-trained base, then adapters) and its TrainState."""
    trainable = lora_cfg.trainable

    def make_model(rngs: nnx.Rngs, base: nnx.State | None = None) -> nnx.Module:
        model = task.make_model(rngs)
        if base is not None:  # pre-trained weights, before adapters and quantization
            nnx.update(model, base)
        return lora.attach(model, lora_cfg, rngs)

    def init_fn(rng: jax.Array, base: nnx.State | None = None) -> TrainState:
        params_rng, dropout_rng = jax.random.split(rng)
        model = make_model(nnx.Rngs(params=params_rng), base)
        params = nnx.state(model, trainable)
        return TrainState(
            params=params,
            opt_state=tx.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=dropout_rng,
            skipped=jnp.zeros((), jnp.int32),
            frozen=nnx.state(model, nnx.Not(trainable)),
        )

    return make_model, init_fn


def _with_shardings(abstract_tree, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )


def _check_batch_divides(config, shards: int) -> None:
    batch, micro = config.train.batch_size, config.train.microbatches
    if batch % (micro * shards):
        raise ConfigError(
            f"config.train.batch_size={batch} is invalid: it must be divisible by "
            f"train.microbatches ({micro}) x the devices the batch is split over ({shards}), "
            f"i.e. a multiple of {micro * shards}."
        )
