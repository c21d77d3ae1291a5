"""Everything a run is built from, derived once from the config: mesh, task, optimizer,
shardings and the compiled steps. Usable on its own from a notebook or a test.

What trains and what stays frozen is decided here, once. The trained model is split by a
filter (`model.lora`: adapters train and the rest is its frozen "base"; without LoRA everything
trains); the task's frozen models (a reference, a teacher) are frozen whole. Each frozen part
is loaded from its own spec and rebuilt, never restored, on resume; the step, the loop and
checkpointing treat them all alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jtrain import mesh as mesh_lib
from jtrain import optim, pretrained, step, tasks
from jtrain.models import lora
from jtrain.state import BASE, TrainState
from jtrain.validation import ConfigError


@dataclasses.dataclass
class Experiment:
    """The static pieces of a run; the only changing thing, the TrainState, lives outside."""

    config: object
    mesh: Mesh
    task: tasks.Task
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    structure: step.Structure  # graph definitions of the trained and the frozen models
    abstract_state: TrainState  # shapes and dtypes only
    state_shardings: TrainState
    # What each part loads from its spec, sharded: the trained model's parameters (before
    # adapters) under BASE, each frozen model's under its name.
    abstract_sources: dict[str, nnx.State]
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable
    _init_fn: Callable
    # The checkpoint step each part's spec is read at (jtrain.frozen_sources pins the steps a
    # run was first built from); a part not named here reads its spec's newest.
    source_steps: dict[str, int | None] = dataclasses.field(default_factory=dict)

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
        parts = _Parts(task, lora.LoRAConfig.from_config(config.model))
        structure = parts.structure()
        init_fn = _state_initializer(parts, tx)
        abstract_state = jax.eval_shape(init_fn, jax.random.key(0), parts.no_sources())
        state_shardings = mesh_lib.tree_shardings(abstract_state, mesh, rules)
        sources = parts.abstract_sources()
        abstract_sources = _with_shardings(sources, mesh_lib.tree_shardings(sources, mesh, rules))
        batch_sharding = mesh_lib.batch_sharding(mesh, rules)
        return cls(
            config=config,
            mesh=mesh,
            task=task,
            tx=tx,
            schedule=schedule,
            structure=structure,
            abstract_state=abstract_state,
            state_shardings=state_shardings,
            abstract_sources=abstract_sources,
            batch_sharding=batch_sharding,
            train_step=step.jit_train_step(
                structure=structure,
                task=task,
                tx=tx,
                schedule=schedule,
                microbatches=config.train.microbatches,
                state_shardings=state_shardings,
                batch_sharding=batch_sharding,
            ),
            eval_step=step.jit_eval_step(
                structure=structure,
                task=task,
                state_shardings=state_shardings,
                batch_sharding=batch_sharding,
            ),
            _init_fn=init_fn,
        )

    @property
    def graphdef(self) -> nnx.GraphDef:
        """The trained model's structure (its frozen base included)."""
        return self.structure.trained

    @property
    def abstract_base(self) -> nnx.State:
        """The trained model's parameters as `model.init_from` loads them, sharded."""
        return self.abstract_sources[BASE]

    def abstract_sharded_state(self) -> TrainState:
        """Shapes, dtypes and target shardings of the state: what a restore fills in."""
        return _with_shardings(self.abstract_state, self.state_shardings)

    def sources(self) -> dict[str, str]:
        """Where each part's weights come from: `model.init_from` for the trained model, each
        frozen model's own spec (or else `model.init_from`); "" = the seed's initialisation."""
        init_from = self.config.model.init_from
        frozen = self.task.frozen_models()
        return {BASE: init_from, **{n: m.init_from or init_from for n, m in frozen.items()}}

    def load_sources(self, names: Sequence[str] | None = None) -> dict[str, nnx.State | None]:
        """The weights of the named parts (all by default) read from their specs, sharded."""
        specs = self.sources()
        names = specs if names is None else names
        return {
            name: pretrained.load(
                specs[name], self.abstract_sources[name], step=self.source_steps.get(name)
            )
            if name in names and specs[name]
            else None
            for name in specs
        }

    def load_base(self) -> nnx.State | None:
        """The trained model's initial parameters from `model.init_from` (None without one)."""
        return self.load_sources([BASE])[BASE]

    def init_state(self, seed: int | None = None, *, base: nnx.State | None = None) -> TrainState:
        """A fresh TrainState, created directly in its sharded placement.

        `base` (shaped like `abstract_base`, e.g. from jtrain.pretrained.load) replaces the
        model's initial parameters; adapters start fresh. Frozen models load from their specs.
        Loaded buffers are donated.
        """
        seed = self.config.seed if seed is None else seed
        loaded = self.load_sources([n for n in self.sources() if n != BASE])
        loaded[BASE] = base
        init = jax.jit(self._init_fn, out_shardings=self.state_shardings, donate_argnames="loaded")
        return init(jax.random.key(seed), loaded)

    def rebuild_frozen(self, seed: int | None = None) -> dict[str, nnx.State]:
        """The frozen parts as the run first built them, for a resume or an export: each read
        again from its spec (only parts that hold something), else made from the seed."""
        seed = self.config.seed if seed is None else seed
        holding = [n for n, part in self.abstract_state.frozen.items() if jax.tree.leaves(part)]
        loaded = self.load_sources(holding)

        def frozen(rng, loaded):
            return self._init_fn(rng, loaded).frozen

        shardings = self.state_shardings.frozen
        init = jax.jit(frozen, out_shardings=shardings, donate_argnames="loaded")
        return init(jax.random.key(seed), loaded)

    def has_frozen_base(self) -> bool:
        """True when part of the trained model is frozen (LoRA): it gets no weight gradients."""
        return bool(jax.tree.leaves(self.abstract_state.frozen[BASE]))

    def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes."""
        return mesh_lib.to_global_batch(local_batch, self.batch_sharding)

    def param_count(self) -> int:
        """Number of trainable parameters."""
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(self.abstract_state.params))

    def frozen_count(self) -> int:
        """Number of frozen values (LoRA base with int8 scales, frozen models)."""
        return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(self.abstract_state.frozen))


class _Parts:
    """How the trained model and the task's frozen models are made and split."""

    def __init__(self, task: tasks.Task, lora_cfg: lora.LoRAConfig):
        self.task, self.lora_cfg = task, lora_cfg
        self.frozen_models = dict(sorted(task.frozen_models().items()))
        if BASE in self.frozen_models:
            raise ConfigError(f"a task's frozen model may not be named {BASE!r}: it is reserved")

    def trained_model(self, rngs: nnx.Rngs, base: nnx.State | None = None) -> nnx.Module:
        """The task's model (pre-trained weights, then adapters and quantization)."""
        model = self.task.make_model(rngs)
        if base is not None:
            nnx.update(model, base)
        return lora.attach(model, self.lora_cfg, rngs)

    def frozen_model(self, name: str, rngs: nnx.Rngs, weights: nnx.State | None) -> nnx.Module:
        model = self.frozen_models[name].make(rngs)
        if weights is not None:
            nnx.update(model, weights)
        return model

    def no_sources(self) -> dict[str, None]:
        return dict.fromkeys([BASE, *self.frozen_models])

    def structure(self) -> step.Structure:
        trained = nnx.graphdef(nnx.eval_shape(lambda: self.trained_model(nnx.Rngs(0))))
        frozen = {
            name: nnx.graphdef(
                nnx.eval_shape(lambda n=name: self.frozen_model(n, nnx.Rngs(0), None))
            )
            for name in self.frozen_models
        }
        return step.Structure(trained, frozen)

    def abstract_sources(self) -> dict[str, nnx.State]:
        def params(make):
            return nnx.state(nnx.eval_shape(lambda: make(nnx.Rngs(0))), nnx.Param)

        out = {BASE: params(self.task.make_model)}
        out.update({name: params(m.make) for name, m in self.frozen_models.items()})
        return out


def _state_initializer(parts: _Parts, tx: optax.GradientTransformation) -> Callable:
    """init(rng, loaded) -> TrainState, `loaded` holding each part's weights or None."""
    trainable = parts.lora_cfg.trainable

    def init_fn(rng: jax.Array, loaded: dict[str, nnx.State | None]) -> TrainState:
        params_rng, dropout_rng = jax.random.split(rng)
        model = parts.trained_model(nnx.Rngs(params=params_rng), loaded[BASE])
        params = nnx.state(model, trainable)
        frozen = {BASE: nnx.state(model, nnx.Not(trainable))}
        for i, name in enumerate(parts.frozen_models, start=1):
            rngs = nnx.Rngs(params=jax.random.fold_in(params_rng, i))
            frozen[name] = nnx.state(parts.frozen_model(name, rngs, loaded[name]))
        return TrainState(
            params=params,
            opt_state=tx.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=dropout_rng,
            skipped=jnp.zeros((), jnp.int32),
            frozen=frozen,
        )

    return init_fn


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
