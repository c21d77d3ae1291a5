"""A small residual convolutional network for images, `model.kind=cnn`.

A 3x3 stem convolution, then `stages` stages of `blocks` pre-activation residual blocks
(norm, activation, 3x3 conv, twice); each stage after the first halves the spatial size with a
stride-2 convolution and doubles the width. Global average pooling and a linear head follow,
so the model fits any image size the data gives (8x8 digits: 8 -> 4 -> 2 over three stages).

Keys (`config.model.*`; missing ones take these defaults):
  channels: 32        width of the first stage
  stages: 3           stages; each after the first halves height and width, doubles the width
  blocks: 2           residual blocks per stage
  norm: "group"       group | layer | none: GroupNorm with gcd(8, C) groups, or a LayerNorm over
                      each pixel's channels; never BatchNorm, so examples never mix
  dropout: 0.0        on the pooled features before the head, during training only
  image_size: 32      the side the data resizes images to (the model adapts to what it gets)
  dtype: "float32"    compute dtype, float32 | bfloat16 (parameters stay float32)

Convolutions carry no bias (a norm follows each one, except with norm=none).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jtrain import models
from jtrain.models import layers
from jtrain.models.inputs import InputSpec
from jtrain.models.mlp import DTYPES, HEAD_STDDEV, SupervisedConfig, scores_only, validate_common
from jtrain.validation import one_of, require

NORMS = ("group", "layer", "none")
# truncated_normal in [-2, 2] has this standard deviation; dividing by it keeps He's variance.
_TRUNCATED_STD = 0.87962566103423978


@dataclasses.dataclass(frozen=True)
class CNNConfig(SupervisedConfig):
    """Hyperparameters of the CNN; field names match the `model.*` keys."""

    channels: int = 32
    stages: int = 3
    blocks: int = 2
    norm: str = "group"
    image_size: int = 32


def block_plan(cfg: CNNConfig) -> list[tuple[int, int, int]]:
    """(input width, output width, stride) of every residual block, in order."""
    plan, width = [], cfg.channels
    for stage in range(cfg.stages):
        out = cfg.channels * 2**stage
        for block in range(cfg.blocks):
            plan.append((width, out, 2 if stage > 0 and block == 0 else 1))
            width = out
    return plan


def conv_kernel(rngs: nnx.Rngs, size: int, c_in: int, c_out: int, *, named_in: bool):
    """An HWIO kernel, He-normal; the input-channel axis is unnamed for the image's channels."""
    stddev = math.sqrt(2.0 / (size * size * c_in)) / _TRUNCATED_STD
    axes = (None, None, "embed" if named_in else None, "mlp")
    return layers.param(rngs, (size, size, c_in, c_out), axes, stddev=stddev)


def conv(x_BxHxWxC: jax.Array, kernel: nnx.Param, stride: int = 1) -> jax.Array:
    """A "SAME"-padded convolution in x's dtype."""
    return jax.lax.conv_general_dilated(
        x_BxHxWxC,
        kernel[...].astype(x_BxHxWxC.dtype),
        window_strides=(stride, stride),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class GroupNorm(nnx.Module):
    """Normalises each example's channel groups over height, width and the group, in float32."""

    def __init__(self, channels: int, *, eps: float = 1e-5, rngs: nnx.Rngs):
        self.scale = layers.param(rngs, (channels,), ("mlp",), stddev=None)
        self.bias = layers.zeros((channels,), ("mlp",))
        self.groups = math.gcd(8, channels)
        self.eps = eps

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        b, h, w, c = x_BxHxWxC.shape
        x = x_BxHxWxC.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(x, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 4), keepdims=True)
        x = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (x * self.scale[...] + self.bias[...]).astype(x_BxHxWxC.dtype)


def make_norm(kind: str, channels: int, rngs: nnx.Rngs):
    """The norm `model.norm` names over `channels`, or None."""
    if kind == "group":
        return GroupNorm(channels, rngs=rngs)
    if kind == "layer":
        return layers.LayerNorm(channels, eps=1e-5, rngs=rngs)
    return None


def _normed(norm, x: jax.Array) -> jax.Array:
    return jax.nn.relu(x if norm is None else norm(x))


class ResidualBlock(nnx.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), with a strided 1x1 shortcut when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, *, rngs: nnx.Rngs):
        self.norm1 = make_norm(norm, c_in, rngs)
        self.conv1 = conv_kernel(rngs, 3, c_in, c_out, named_in=True)
        self.norm2 = make_norm(norm, c_out, rngs)
        self.conv2 = conv_kernel(rngs, 3, c_out, c_out, named_in=True)
        reshapes = stride != 1 or c_in != c_out
        self.shortcut = conv_kernel(rngs, 1, c_in, c_out, named_in=True) if reshapes else None
        self.stride = stride

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        h = _normed(self.norm1, x_BxHxWxC)
        # Pre-activation: a projection shortcut reads the normed input, as in ResNet v2.
        skip = x_BxHxWxC if self.shortcut is None else conv(h, self.shortcut, self.stride)
        h = conv(h, self.conv1, self.stride)
        h = conv(_normed(self.norm2, h), self.conv2)
        return skip + h


class CNN(nnx.Module):
    """The model: {"image": [B, H, W, C]} -> float32 scores [B, outputs]."""

    def __init__(self, cfg: CNNConfig, *, inputs: InputSpec, outputs: int, rngs: nnx.Rngs):
        require(
            inputs.image_shape is not None,
            "model.kind",
            "cnn",
            "needs image inputs and this data has only table columns; use model.kind=mlp",
        )
        self.cfg = cfg
        self.stem = conv_kernel(rngs, 3, inputs.image_shape[2], cfg.channels, named_in=False)
        self.blocks = nnx.List(
            ResidualBlock(c_in, c_out, stride, cfg.norm, rngs=rngs)
            for c_in, c_out, stride in block_plan(cfg)
        )
        width = block_plan(cfg)[-1][1]
        self.final_norm = make_norm(cfg.norm, width, rngs)
        self.head = layers.param(rngs, (width, outputs), ("mlp", None), stddev=HEAD_STDDEV)
        self.head_bias = layers.Bias((outputs,), (None,))

    def features(self, inputs: dict[str, jax.Array]) -> jax.Array:
        """The pooled features the head reads, float32 [B, C] (drift monitoring compares them)."""
        x = conv(inputs["image"].astype(DTYPES[self.cfg.dtype]), self.stem)
        for block in self.blocks:
            x = block(x)
        return jnp.mean(_normed(self.final_norm, x).astype(jnp.float32), axis=(1, 2))

    def __call__(
        self, inputs: dict[str, jax.Array], *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """Float32 scores [B, outputs]; dropout only when a dropout_rng is given."""
        pooled_BxC = layers.dropout(self.features(inputs), self.cfg.dropout, dropout_rng)
        return self.head_bias(layers.dense(pooled_BxC, self.head[...]))


@models.register("cnn")
class CNNFamily:
    """Residual convolutional networks with per-example normalisation."""

    reads = "arrays"

    def validate(self, config) -> None:
        """Checks the CNN's `model.*` keys; ConfigError names the first bad one."""
        cfg = CNNConfig.from_mapping(config.model)
        validate_common(cfg, ("channels", "stages", "blocks", "image_size"))
        one_of("model.norm", cfg.norm, NORMS)

    def make(
        self, model_config, *, head: str, rngs: nnx.Rngs, outputs: int, inputs: InputSpec
    ) -> CNN:
        """A freshly initialised CNN for these images with `outputs` scores."""
        scores_only("cnn", head)
        return CNN(CNNConfig.from_mapping(model_config), inputs=inputs, outputs=outputs, rngs=rngs)

    def forward_flops(self, model_config, inputs: InputSpec, outputs: int) -> float:
        """Forward FLOPs per example: 2 per multiply-accumulate of the convolutions and head."""
        cfg = CNNConfig.from_mapping(model_config)
        h, w, c = inputs.image_shape
        macs = h * w * 9 * c * cfg.channels
        for c_in, c_out, stride in block_plan(cfg):
            h, w = -(-h // stride), -(-w // stride)  # "SAME" padding: ceil(size / stride)
            macs += h * w * 9 * (c_in * c_out + c_out * c_out)
            if stride != 1 or c_in != c_out:
                macs += h * w * c_in * c_out
        return 2.0 * (macs + block_plan(cfg)[-1][1] * outputs)
