"""A Vision Transformer for images, `model.kind=vit`.

The image is cut into patch_size x patch_size patches, each flattened and mapped linearly to
d_model, plus a learned position embedding (and a learned class token with pooling=cls). Pre-norm
blocks of bidirectional attention and a GELU MLP (jtrain.models.layers', stacked and scanned as
in the transformer), a final LayerNorm, then the class token or the mean of the patches goes
through a linear head.

Keys (`config.model.*`; missing ones take these defaults):
  image_size: 32      the side the data resizes images to; patch_size must divide it
  patch_size: 4       patch side in pixels
  d_model: 128        token width
  n_layers: 4         blocks
  n_heads: 4          attention heads; divides d_model
  d_ff: 256           MLP hidden width
  pooling: "cls"      cls (a learned class token) | mean (the mean of the patch tokens)
  dropout: 0.0        on each block's residual branches, during training only
  dtype: "float32"    compute dtype, float32 | bfloat16 (parameters stay float32)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jtrain import models
from jtrain.models import layers
from jtrain.models.inputs import InputSpec
from jtrain.models.mlp import DTYPES, HEAD_STDDEV, SupervisedConfig, scores_only, validate_common
from jtrain.models.transformer import Block, TransformerConfig
from jtrain.validation import ConfigError, one_of, require

POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ViTConfig(SupervisedConfig):
    """Hyperparameters of the ViT; field names match the `model.*` keys."""

    image_size: int = 32
    patch_size: int = 4
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    pooling: str = "cls"

    def block_config(self, tokens: int) -> TransformerConfig:
        """The TransformerConfig layers.Attention and layers.MLP read: GPT-2-style blocks with
        learned positions (no RoPE), biases, LayerNorm and a plain GELU MLP."""
        return TransformerConfig(
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            head_dim=self.d_model // self.n_heads,
            d_ff=self.d_ff,
            norm_eps=1e-6,
            dropout=self.dropout,
            norm="layer",
            positions="learned",
            max_seq_len=tokens,
            qkv_bias=True,
            out_bias=True,
            mlp_gated=False,
            mlp_activation="gelu",
            mlp_bias=True,
        )


def patch_grid(cfg: ViTConfig, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """Patches along height and width; ConfigError unless patch_size divides both sides."""
    h, w, _ = image_shape
    p = cfg.patch_size
    if h % p or w % p:
        raise ConfigError(
            f"config.model.patch_size={p!r} is invalid: it must divide the images' height and "
            f"width, and the data gives {h}x{w}; set model.image_size to a multiple of it."
        )
    return h // p, w // p


class ViT(nnx.Module):
    """The model: {"image": [B, H, W, C]} -> float32 scores [B, outputs]."""

    def __init__(self, cfg: ViTConfig, *, inputs: InputSpec, outputs: int, rngs: nnx.Rngs):
        require(
            inputs.image_shape is not None,
            "model.kind",
            "vit",
            "needs image inputs and this data has only table columns; use model.kind=mlp",
        )
        self.cfg = cfg
        grid_h, grid_w = patch_grid(cfg, inputs.image_shape)
        patch_dim = cfg.patch_size**2 * inputs.image_shape[2]
        tokens = grid_h * grid_w + (cfg.pooling == "cls")
        block_cfg = cfg.block_config(tokens)
        d = cfg.d_model
        self.patch_PxD = layers.param(rngs, (patch_dim, d), (None, "embed"), stddev=patch_dim**-0.5)
        self.patch_bias = layers.Bias((d,), ("embed",))
        self.pos_embed_LxD = layers.param(rngs, (tokens, d), (None, "embed"), stddev=0.02)
        self.cls_D = (
            layers.param(rngs, (d,), ("embed",), stddev=0.02) if cfg.pooling == "cls" else None
        )

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(block_cfg, causal=False, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = layers.norm(block_cfg, rngs=rngs)
        self.head_DxO = layers.param(rngs, (d, outputs), ("embed", None), stddev=HEAD_STDDEV)
        self.head_bias = layers.Bias((outputs,), (None,))

    def embed(self, image_BxHxWxC: jax.Array) -> jax.Array:
        """Patch tokens (after the class token, if any) plus positions [B, L, D]."""
        dtype = DTYPES[self.cfg.dtype]
        b, h, w, c = image_BxHxWxC.shape
        p = self.cfg.patch_size
        x = image_BxHxWxC.astype(dtype).reshape(b, h // p, p, w // p, p, c)
        patches_BxNxP = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
        x_BxNxD = self.patch_bias(layers.dense(patches_BxNxP, self.patch_PxD[...]))
        if self.cls_D is not None:
            cls_Bx1xD = jnp.broadcast_to(self.cls_D[...].astype(dtype), (b, 1, self.cfg.d_model))
            x_BxNxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
        return x_BxNxD + self.pos_embed_LxD[...].astype(dtype)

    def __call__(
        self, inputs: dict[str, jax.Array], *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """Float32 scores [B, outputs]; dropout only when a dropout_rng is given."""
        pooled_BxD = self.features(inputs, dropout_rng=dropout_rng)
        return self.head_bias(layers.dense(pooled_BxD, self.head_DxO[...])).astype(jnp.float32)

    def features(
        self, inputs: dict[str, jax.Array], *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """The pooled features the head reads [B, D] (drift monitoring compares them)."""
        block_def, block_state = nnx.split(self.blocks)
        layer_rngs = None
        if dropout_rng is not None:
            layer_rngs = jax.random.split(dropout_rng, self.cfg.n_layers)

        def run_block(x, layer):
            state, rng = layer
            x, _ = nnx.merge(block_def, state)(x, None, None, rng)
            return x, None

        x_BxLxD, _ = jax.lax.scan(run_block, self.embed(inputs["image"]), (block_state, layer_rngs))
        x_BxLxD = self.final_norm(x_BxLxD)
        return x_BxLxD[:, 0] if self.cls_D is not None else jnp.mean(x_BxLxD, axis=1)


@models.register("vit")
class ViTFamily:
    """Vision Transformers: patches, bidirectional pre-norm blocks, a class-token or mean head."""

    reads = "arrays"

    def validate(self, config) -> None:
        """Checks the ViT's `model.*` keys; ConfigError names the first bad one."""
        cfg = ViTConfig.from_mapping(config.model)
        sizes = ("image_size", "patch_size", "d_model", "n_layers", "n_heads", "d_ff")
        validate_common(cfg, sizes)
        require(
            cfg.image_size % cfg.patch_size == 0,
            "model.patch_size",
            cfg.patch_size,
            f"must divide model.image_size={cfg.image_size}",
        )
        require(
            cfg.d_model % cfg.n_heads == 0,
            "model.n_heads",
            cfg.n_heads,
            f"must divide model.d_model={cfg.d_model}",
        )
        one_of("model.pooling", cfg.pooling, POOLINGS)

    def make(
        self, model_config, *, head: str, rngs: nnx.Rngs, outputs: int, inputs: InputSpec
    ) -> ViT:
        """A freshly initialised ViT for these images with `outputs` scores."""
        scores_only("vit", head)
        return ViT(ViTConfig.from_mapping(model_config), inputs=inputs, outputs=outputs, rngs=rngs)

    def forward_flops(self, model_config, inputs: InputSpec, outputs: int) -> float:
        """Forward FLOPs per example: 2 per multiply-accumulate, attention scores included."""
        cfg = ViTConfig.from_mapping(model_config)
        grid_h, grid_w = patch_grid(cfg, inputs.image_shape)
        patches, d = grid_h * grid_w, cfg.d_model
        tokens = patches + (cfg.pooling == "cls")
        patch_dim = cfg.patch_size**2 * inputs.image_shape[2]
        per_layer = tokens * (4 * d * d + 2 * d * cfg.d_ff) + 2 * tokens * tokens * d
        return 2.0 * (patches * patch_dim * d + cfg.n_layers * per_layer + d * outputs)
