"""A multilayer perceptron for tables (and flattened small images), `model.kind=mlp`.

Numeric columns, an embedding per categorical column and any image (flattened) are
concatenated into one feature vector, which runs through `depth` dense layers and a linear head.
A linear path from the features straight to the outputs ("wide and deep") lets the model match
linear regression on small tables, where the deep part alone overfits or underfits.

Keys (`config.model.*`; missing ones take these defaults):
  width: 128          hidden width
  depth: 2            hidden layers (0: a linear model of the features)
  dropout: 0.1        after each hidden layer, during training only
  embed_dim: 8        embedding width of each categorical column
  linear_skip: True   add a linear map of the features to the outputs
  activation: "gelu"  gelu | relu | silu
  norm: "layer"       layer | none: LayerNorm after each hidden dense layer
  dtype: "float32"    compute dtype, float32 | bfloat16 (parameters stay float32)

Nothing normalises across examples (no batch statistics), so a batch's loss is the same however
it is split into micro-batches or over devices. Also the shared helpers of the supervised
families (`SupervisedConfig`, `scores_only`, `validate_common`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jtrain import models
from jtrain.models import layers
from jtrain.models.inputs import InputSpec
from jtrain.models.transformer import DTYPES
from jtrain.validation import ConfigError, one_of, positive_ints, require

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
# The head starts small: early outputs sit near zero (uniform class probabilities).
HEAD_STDDEV = 0.01


@dataclasses.dataclass(frozen=True)
class SupervisedConfig:
    """Base of the supervised families' configs: built from `config.model` with defaults."""

    dropout: float = 0.0
    dtype: str = "float32"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]):
        """The config of `config.model`, ignoring other families' keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def scores_only(kind: str, head: str) -> None:
    """Raises ConfigError unless `head` is "scores", the one head these families have."""
    if head != "scores":
        raise ConfigError(
            f"model.kind={kind} has only a scores head; head={head!r} needs a task that "
            "predicts scores (classification or regression), or model.kind=transformer."
        )


def validate_common(cfg, sizes: tuple[str, ...]) -> None:
    """Checks the keys every supervised family has, and that `sizes` are positive ints."""
    positive_ints(dataclasses.asdict(cfg), "model", sizes)
    ok = isinstance(cfg.dropout, int | float) and 0.0 <= cfg.dropout < 1.0
    require(ok, "model.dropout", cfg.dropout, "must be in [0, 1)")
    one_of("model.dtype", cfg.dtype, DTYPES)


@dataclasses.dataclass(frozen=True)
class MLPConfig(SupervisedConfig):
    """Hyperparameters of the MLP; field names match the `model.*` keys."""

    width: int = 128
    depth: int = 2
    dropout: float = 0.1
    embed_dim: int = 8
    linear_skip: bool = True
    activation: str = "gelu"
    norm: str = "layer"


def feature_count(inputs: InputSpec, embed_dim: int) -> int:
    """Width of the concatenated feature vector the MLP reads."""
    image = math.prod(inputs.image_shape) if inputs.image_shape else 0
    return inputs.numeric + len(inputs.categories) * embed_dim + image


class Dense(nnx.Module):
    """x @ kernel + bias; the kernel's input axis is named only when it is a hidden width."""

    def __init__(self, n_in: int, n_out: int, axes, *, stddev: float | None, rngs: nnx.Rngs):
        if stddev == 0.0:
            self.kernel = layers.zeros((n_in, n_out), axes)
        else:
            self.kernel = layers.param(rngs, (n_in, n_out), axes, stddev=stddev)
        self.bias = layers.zeros((n_out,), axes[1:])

    def __call__(self, x_BxI: jax.Array) -> jax.Array:
        return layers.dense(x_BxI, self.kernel[...]) + self.bias[...].astype(x_BxI.dtype)


class Hidden(nnx.Module):
    """One hidden layer: dense, LayerNorm (optional), activation."""

    def __init__(self, n_in: int, cfg: MLPConfig, *, first: bool, rngs: nnx.Rngs):
        # Feature counts depend on the data, so the first kernel's input axis is unsharded.
        axes = (None if first else "mlp", "embed")
        self.dense = Dense(n_in, cfg.width, axes, stddev=math.sqrt(2.0 / n_in), rngs=rngs)
        self.norm = (
            layers.LayerNorm(cfg.width, eps=1e-5, rngs=rngs) if cfg.norm == "layer" else None
        )
        self.activation = ACTIVATIONS[cfg.activation]

    def __call__(self, x_BxI: jax.Array) -> jax.Array:
        h_BxW = self.dense(x_BxI)
        return self.activation(h_BxW if self.norm is None else self.norm(h_BxW))


class MLP(nnx.Module):
    """The model: a batch dict -> float32 scores [B, outputs]."""

    def __init__(self, cfg: MLPConfig, *, inputs: InputSpec, outputs: int, rngs: nnx.Rngs):
        self.cfg = cfg
        # Which batch keys to read: the spec's, not whatever else a batch carries.
        self.reads_numeric, self.reads_image = inputs.numeric > 0, inputs.image_shape is not None
        n_features = feature_count(inputs, cfg.embed_dim)
        # One table for every categorical column: column i's ids start at offsets[i].
        self.offsets = tuple(sum(inputs.categories[:i]) for i in range(len(inputs.categories)))
        table_shape = (sum(inputs.categories), cfg.embed_dim)
        self.embed_table = (
            layers.param(rngs, table_shape, (None, None), stddev=1.0) if inputs.categories else None
        )
        sizes = [n_features] + [cfg.width] * cfg.depth
        self.hidden = nnx.List(
            Hidden(n, cfg, first=i == 0, rngs=rngs) for i, n in enumerate(sizes[:-1])
        )
        head_axes = ("mlp" if cfg.depth else None, None)
        self.head = Dense(sizes[-1], outputs, head_axes, stddev=HEAD_STDDEV, rngs=rngs)
        # Zeros: training starts from the deep model alone and grows the linear part.
        with_skip = cfg.linear_skip and cfg.depth > 0
        self.skip = (
            Dense(n_features, outputs, (None, None), stddev=0.0, rngs=rngs) if with_skip else None
        )

    def features(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """The concatenated features [B, F] in the compute dtype."""
        parts = []
        if self.reads_numeric:
            parts.append(inputs["numeric"])
        if self.embed_table is not None:
            ids_BxC = inputs["categorical"] + jnp.asarray(self.offsets, jnp.int32)
            embedded_BxCxE = self.embed_table[...][ids_BxC]
            parts.append(embedded_BxCxE.reshape(ids_BxC.shape[0], -1))
        if self.reads_image:
            parts.append(inputs["image"].reshape(inputs["image"].shape[0], -1))
        dtype = DTYPES[self.cfg.dtype]
        return jnp.concatenate([p.astype(dtype) for p in parts], axis=-1)

    def __call__(
        self, inputs: dict[str, jax.Array], *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """Float32 scores [B, outputs]; dropout only when a dropout_rng is given."""
        x_BxF = self.features(inputs)
        h = x_BxF
        for i, layer in enumerate(self.hidden):
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            h = layers.dropout(layer(h), self.cfg.dropout, rng)
        out_BxO = self.head(h)
        if self.skip is not None:
            out_BxO = out_BxO + self.skip(x_BxF)
        return out_BxO.astype(jnp.float32)


@models.register("mlp")
class MLPFamily:
    """Multilayer perceptrons on numeric, categorical and flattened image inputs."""

    reads = "arrays"

    def validate(self, config) -> None:
        """Checks the MLP's `model.*` keys; ConfigError names the first bad one."""
        cfg = MLPConfig.from_mapping(config.model)
        validate_common(cfg, ("width", "embed_dim"))
        depth_ok = isinstance(cfg.depth, int) and not isinstance(cfg.depth, bool)
        require(depth_ok and cfg.depth >= 0, "model.depth", cfg.depth, "must be an integer >= 0")
        one_of("model.linear_skip", cfg.linear_skip, (True, False))
        one_of("model.activation", cfg.activation, ACTIVATIONS)
        one_of("model.norm", cfg.norm, ("layer", "none"))

    def make(
        self, model_config, *, head: str, rngs: nnx.Rngs, outputs: int, inputs: InputSpec
    ) -> MLP:
        """A freshly initialised MLP for these inputs with `outputs` scores."""
        scores_only("mlp", head)
        return MLP(MLPConfig.from_mapping(model_config), inputs=inputs, outputs=outputs, rngs=rngs)

    def forward_flops(self, model_config, inputs: InputSpec, outputs: int) -> float:
        """Forward FLOPs per example: 2 per multiply-accumulate of every dense layer."""
        cfg = MLPConfig.from_mapping(model_config)
        n_features = feature_count(inputs, cfg.embed_dim)
        sizes = [n_features] + [cfg.width] * cfg.depth + [outputs]
        macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        if cfg.linear_skip and cfg.depth:
            macs += n_features * outputs
        return 2.0 * macs
