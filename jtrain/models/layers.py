"""Building blocks of decoder transformers: parameters with logical axes, RMSNorm/LayerNorm,
RoPE (with Llama 3 / linear frequency scaling), grouped-query attention and the MLP.

The defaults are the Llama recipe; the options (biases, LayerNorm, a plain GELU MLP, a sliding
window) are those the Hugging Face families in jtrain/interop/hf.py need.

Shape suffixes name dimensions: B batch, L sequence, D model width, H query heads,
G key/value heads, K head width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jtrain.models import attention_impl


def param(
    rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], *, stddev: float | None
) -> nnx.Param:
    """A float32 parameter tagged with logical axis names; stddev=None means ones."""
    if stddev is None:
        value = jnp.ones(shape, jnp.float32)
    else:
        value = stddev * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    # eager_sharding=False: shardings are derived later from these names and config rules,
    # so creating a module never needs a mesh (notebooks, eval_shape, tests).
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def zeros(shape: Sequence[int], axes: Sequence[str | None]) -> nnx.Param:
    """A float32 parameter of zeros (biases) tagged with logical axis names."""
    value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def dense(x: jax.Array, kernel: jax.Array, *, contract: int = 1) -> jax.Array:
    """Contracts x's last `contract` dims with kernel's first ones, in kernel's dtype cast to x's.

    Done as one 2-D matmul: XLA:CPU runs the gradients of batched [B, L, D] dots about 1.5x
    slower than the same work flattened to [B*L, D] (measured), and the reshapes are free.
    """
    in_shape, out_shape = kernel.shape[:contract], kernel.shape[contract:]
    lead = x.shape[: x.ndim - contract]
    x_2d = x.reshape(-1, math.prod(in_shape))
    kernel_2d = kernel.reshape(math.prod(in_shape), math.prod(out_shape)).astype(x.dtype)
    return (x_2d @ kernel_2d).reshape(*lead, *out_shape)


def project(
    module: nnx.Module, name: str, x: jax.Array, dropout_rng: jax.Array | None
) -> jax.Array:
    """x times the module's kernel `name`, plus the kernel's LoRA update if one is attached."""
    y = dense(x, getattr(module, name)[...], contract=module.KERNELS[name])
    adapter = None if module.lora is None else module.lora.get(name)
    return y if adapter is None else y + adapter(x, dropout_rng).astype(y.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when rate is 0 or no rng is given (evaluation)."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned scale, computed in float32."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("embed",), stddev=None)
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BxLxD.dtype)


class LayerNorm(nnx.Module):
    """Layer norm with a learned scale and bias (GPT-2), computed in float32."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("embed",), stddev=None)
        self.bias = zeros((dim,), ("embed",))
        self.eps = eps

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...] + self.bias[...]).astype(x_BxLxD.dtype)


def norm(cfg, *, rngs: nnx.Rngs) -> RMSNorm | LayerNorm:
    """The normalisation layer cfg.norm names: "rms" or "layer"."""
    cls = {"rms": RMSNorm, "layer": LayerNorm}[cfg.norm]
    return cls(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rescaled RoPE frequencies for longer contexts, as Hugging Face's "linear" and "llama3"."""

    kind: str  # linear | llama3
    factor: float
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / this are scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept
    original_max_len: int = 8192  # llama3: the context length of pretraining

    def __call__(self, inv_freq_K: jax.Array) -> jax.Array:
        if self.kind == "linear":
            return inv_freq_K / self.factor
        # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between.
        wavelen_K = 2 * math.pi / inv_freq_K
        low_wavelen = self.original_max_len / self.low_freq_factor
        high_wavelen = self.original_max_len / self.high_freq_factor
        scaled_K = jnp.where(wavelen_K > low_wavelen, inv_freq_K / self.factor, inv_freq_K)
        smooth_K = (self.original_max_len / wavelen_K - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed_K = (1 - smooth_K) * scaled_K / self.factor + smooth_K * scaled_K
        medium_K = (wavelen_K >= high_wavelen) & (wavelen_K <= low_wavelen)
        return jnp.where(medium_K, smoothed_K, scaled_K)


def rope_scaling(cfg) -> RopeScaling | None:
    """The RopeScaling of a model config, or None for plain RoPE."""
    if cfg.rope_scaling == "none":
        return None
    return RopeScaling(
        kind=cfg.rope_scaling,
        factor=cfg.rope_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_len=cfg.rope_original_max_len,
    )


def apply_rope(
    x_BxLxNxK: jax.Array,
    positions_BxL: jax.Array,
    theta: float,
    *,
    scaling: RopeScaling | None = None,
) -> jax.Array:
    """Rotary position embedding in the Llama/Hugging Face layout (rotate the two halves)."""
    half = x_BxLxNxK.shape[-1] // 2
    inv_freq_k = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is not None:
        inv_freq_k = scaling(inv_freq_k)
    angle_BxLxK = positions_BxL[..., None].astype(jnp.float32) * inv_freq_k
    sin, cos = jnp.sin(angle_BxLxK)[:, :, None, :], jnp.cos(angle_BxLxK)[:, :, None, :]
    x = x_BxLxNxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxNxK.dtype)


def attention_mask(segment_ids_BxL: jax.Array | None) -> jax.Array | None:
    """[B, 1, L, L] mask keeping attention inside a document (causality is added separately);
    XLA and cuDNN both take it (cuDNN as an additive bias: see attention_impl)."""
    if segment_ids_BxL is None:
        return None
    same = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return same[:, None, :, :]


class Bias(nnx.Module):
    """A learned additive bias. A module of its own so that the leaf is named "bias", which
    jtrain.optim exempts from weight decay."""

    def __init__(self, shape: Sequence[int], axes: Sequence[str]):
        self.bias = zeros(shape, axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.bias[...].astype(x.dtype)


def _add_bias(x: jax.Array, bias: Bias | None) -> jax.Array:
    return x if bias is None else bias(x)


@struct.dataclass
class KVCache:
    """One layer's keys [B, G, K, S] and values [B, G, S, K] for decoding: the layouts
    `attention_impl.attend_cached` multiplies without a transpose (queries by keys, then
    probabilities by values, each a plain matrix product per row and key head).

    `index` is the first slot this call writes; `mask` [B, 1, T, S] says which slots each of
    the T new tokens may attend to (the sampler builds it once for every layer). Every layer
    has its own buffers, so XLA writes the new slots in place inside the decode loop.
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array
    mask: jax.Array

    def write(self, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array) -> KVCache:
        """The cache with this call's T new keys and values stored from slot `index` on."""
        new_k = k_BxTxGxK.transpose(0, 2, 3, 1).astype(self.k.dtype)
        new_v = v_BxTxGxK.swapaxes(1, 2).astype(self.v.dtype)
        k = jax.lax.dynamic_update_slice(self.k, new_k, (0, 0, 0, self.index))
        v = jax.lax.dynamic_update_slice(self.v, new_v, (0, 0, self.index, 0))
        return self.replace(k=k, v=v)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings (unless positions are learned);
    causal unless built with causal=False (encoders such as the ViT)."""

    # Projection kernels -> how many leading dims each contracts (what LoRA can adapt).
    KERNELS = {"q_DxHxK": 1, "k_DxGxK": 1, "v_DxGxK": 1, "o_HxKxD": 2}

    def __init__(self, cfg, *, causal: bool = True, rngs: nnx.Rngs):
        d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out_std = 1.0 / math.sqrt(h * k) / math.sqrt(2 * cfg.n_layers)
        self.q_DxHxK = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), stddev=d**-0.5)
        self.k_DxGxK = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), stddev=d**-0.5)
        self.v_DxGxK = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), stddev=d**-0.5)
        self.o_HxKxD = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), stddev=out_std)
        qkv_bias, out_bias = cfg.qkv_bias, cfg.out_bias
        self.q_bias_HxK = Bias((h, k), ("heads", "head_dim")) if qkv_bias else None
        self.k_bias_GxK = Bias((g, k), ("kv_heads", "head_dim")) if qkv_bias else None
        self.v_bias_GxK = Bias((g, k), ("kv_heads", "head_dim")) if qkv_bias else None
        self.o_bias_D = Bias((d,), ("embed",)) if out_bias else None
        self.rope = cfg.positions == "rope"
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = rope_scaling(cfg)
        # A token attends to itself and the sliding_window - 1 tokens before it (Mistral).
        self.local_window = (cfg.sliding_window - 1, 0) if cfg.sliding_window else None
        # "auto" is settled here, once per model shape (attention_impl.resolve caches it).
        self.implementation = attention_impl.resolve(
            cfg.attention, dtype=cfg.dtype, head_dim=k, sliding_window=bool(cfg.sliding_window)
        )
        self.causal = causal
        self.lora = nnx.data(None)  # adapters: jtrain.models.lora.attach sets them

    def __call__(
        self,
        x_BxLxD: jax.Array,
        positions_BxL: jax.Array,
        mask_Bx1xLxL: jax.Array | None,
        dropout_rng: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The attention output and, when decoding, the cache with this call's keys and values.

        Without a cache x attends over itself, causally unless built with causal=False; with one,
        x's keys and values are written at `cache.index` and x attends over the whole cache
        through `cache.mask`, which already holds causality, padding and the sliding window.
        """
        q = _add_bias(project(self, "q_DxHxK", x_BxLxD, dropout_rng), self.q_bias_HxK)
        k = _add_bias(project(self, "k_DxGxK", x_BxLxD, dropout_rng), self.k_bias_GxK)
        v = _add_bias(project(self, "v_DxGxK", x_BxLxD, dropout_rng), self.v_bias_GxK)
        if self.rope:
            q = apply_rope(q, positions_BxL, self.rope_theta, scaling=self.rope_scaling)
            k = apply_rope(k, positions_BxL, self.rope_theta, scaling=self.rope_scaling)
        # Grouped-query attention: each key/value head serves n_heads // n_kv_heads query heads.
        if cache is not None:
            cache = cache.write(k, v)
        if cache is not None and cache.v.shape[2] > q.shape[1]:  # decoding: earlier slots too
            out_BxLxHxK = attention_impl.attend_cached(q, cache.k, cache.v, cache.mask)
        else:
            # Training, or a prefill (the cache holds this call's tokens only, and its mask
            # already has causality, padding and the window): the model's own kernel, so a
            # long prompt gets cuDNN's flash attention where it runs, never [L, L] scores.
            mask = mask_Bx1xLxL if cache is None else cache.mask
            kernel = attention_impl.kernel_for_call(
                self.implementation, masked=mask is not None, length=q.shape[1]
            )
            out_BxLxHxK = attention_impl.attend(
                q,
                k,
                v,
                mask=mask,
                causal=self.causal and cache is None,
                local_window=self.local_window if cache is None else None,
                implementation=kernel,
            )
        out = _add_bias(project(self, "o_HxKxD", out_BxLxHxK, dropout_rng), self.o_bias_D)
        return out, cache


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


class MLP(nnx.Module):
    """Gated feed-forward block down(act(gate(x)) * up(x)) (SwiGLU), or down(act(up(x)))."""

    KERNELS = {"gate_DxF": 1, "up_DxF": 1, "down_FxD": 1}

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        out_std = f**-0.5 / math.sqrt(2 * cfg.n_layers)
        gated, bias = cfg.mlp_gated, cfg.mlp_bias
        self.gate_DxF = param(rngs, (d, f), ("embed", "mlp"), stddev=d**-0.5) if gated else None
        self.up_DxF = param(rngs, (d, f), ("embed", "mlp"), stddev=d**-0.5)
        self.down_FxD = param(rngs, (f, d), ("mlp", "embed"), stddev=out_std)
        self.gate_bias_F = Bias((f,), ("mlp",)) if gated and bias else None
        self.up_bias_F = Bias((f,), ("mlp",)) if bias else None
        self.down_bias_D = Bias((d,), ("embed",)) if bias else None
        self.activation = ACTIVATIONS[cfg.mlp_activation]
        self.lora = nnx.data(None)  # adapters: jtrain.models.lora.attach sets them

    def __call__(self, x_BxLxD: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        h_BxLxF = _add_bias(project(self, "up_DxF", x_BxLxD, dropout_rng), self.up_bias_F)
        if self.gate_DxF is None:
            h_BxLxF = self.activation(h_BxLxF)
        else:
            gate = _add_bias(project(self, "gate_DxF", x_BxLxD, dropout_rng), self.gate_bias_F)
            h_BxLxF = self.activation(gate) * h_BxLxF
        return _add_bias(project(self, "down_FxD", h_BxLxF, dropout_rng), self.down_bias_D)
