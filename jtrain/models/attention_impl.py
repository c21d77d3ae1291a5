"""Which kernel computes attention: XLA's (every backend) or cuDNN's fused flash attention
(NVIDIA GPUs), as `model.attention` says: `xla`, `cudnn`, or `auto` (cuDNN where it can run).

Both go through `jax.nn.dot_product_attention`. What its cuDNN path accepts is restated from
jax's own checks (jax/_src/nn/functions.py and jax/_src/cudnn/fused_attention_stablehlo.py,
jax 0.10) and the cuDNN support matrix: an NVIDIA GPU of compute capability 8.0 or newer, 16-bit
inputs, a head width that is a multiple of 8 and at most 128 (256 from Hopper on), and cuDNN
9.2 for a sliding window. `cudnn_unsupported` is that check as a pure function of the device
and the model's shape, so its GPU branches are tested on CPU; `resolve` applies it to this
process's device once per model shape and says on the console what `auto` chose and why.

Packed batches: the public API takes no segment ids (`query_seq_lengths` describes one sequence
per row plus padding, not several documents), so documents reach cuDNN as the same boolean
[B, 1, L, L] mask XLA gets, which jax turns into an additive bias for the kernel. cuDNN takes a
bias in training only for even sequence lengths, so a masked call of odd length uses XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jtrain import console
from jtrain.validation import ConfigError, one_of

IMPLEMENTATIONS = ("xla", "cudnn", "auto")
_SIXTEEN_BIT = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Device:
    """What decides whether cuDNN attention runs: the backend and, on NVIDIA GPUs, versions."""

    platform: str  # jax's backend name: cpu, tpu, gpu (NVIDIA, CUDA) or rocm
    compute_capability: str = ""  # NVIDIA GPUs: "9.0" for an H100
    cudnn_version: int = 0  # 90800 for cuDNN 9.8.0; 0: jax found no cuDNN


def cudnn_unsupported(
    device: Device, *, dtype: str, head_dim: int, sliding_window: bool = False
) -> str | None:
    """Why cuDNN's fused attention cannot run for this device and model shape, or None."""
    if device.platform != "gpu":
        return f"it runs on NVIDIA GPUs only and this run's backend is {device.platform}"
    if device.cudnn_version == 0:
        return "jax found no cuDNN (install jax's CUDA build: pip install 'jtrain[cuda12]')"
    if dtype not in _SIXTEEN_BIT:
        return f"it computes in 16 bits and model.dtype is {dtype} (use bfloat16)"
    capability = tuple(int(part) for part in (device.compute_capability or "0.0").split("."))
    if capability < (8, 0):
        have = device.compute_capability
        return f"it needs compute capability 8.0 (Ampere) or newer; this GPU has {have}"
    if capability == (10, 3) and device.cudnn_version < 91100:
        return f"compute capability 10.3 needs cuDNN 9.11 or newer; jax has {_cudnn(device)}"
    widest = 256 if capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > widest:
        return f"it needs model.head_dim a multiple of 8 and at most {widest}; it is {head_dim}"
    if sliding_window and device.cudnn_version < 90200:
        return f"a sliding window needs cuDNN 9.2 or newer; jax has {_cudnn(device)}"
    return None


def _cudnn(device: Device) -> str:
    """cuDNN's version number (90800) as people write it (9.8)."""
    return f"{device.cudnn_version // 10000}.{device.cudnn_version // 100 % 100}"


def choose(
    requested: str, device: Device, *, dtype: str, head_dim: int, sliding_window: bool = False
) -> tuple[str, str]:
    """The kernel to use ("xla" or "cudnn") and, where `auto` fell back to XLA, why.

    An explicit "cudnn" that cannot run is a ConfigError rather than a silent fallback.
    """
    one_of("model.attention", requested, IMPLEMENTATIONS)
    if requested == "xla":
        return "xla", ""
    why = cudnn_unsupported(device, dtype=dtype, head_dim=head_dim, sliding_window=sliding_window)
    if why is None:
        return "cudnn", ""
    if requested == "cudnn":
        raise ConfigError(
            f"config.model.attention='cudnn' is invalid: cuDNN's fused attention cannot run "
            f"here: {why}. Use 'auto' (cuDNN where it can run, XLA elsewhere) or 'xla'."
        )
    return "xla", why


def this_device() -> Device:
    """The Device this process computes on (its default backend's first device)."""
    device = jax.devices()[0]
    platform = jax.default_backend()
    if platform != "gpu":
        return Device(platform)
    if "cuda" not in device.client.platform_version.lower():
        return Device("rocm")
    return Device("gpu", getattr(device, "compute_capability", "0.0"), _cudnn_version())


def _cudnn_version() -> int:
    # jax's own cuDNN attention asks the same module (jax._src.lib.cuda_versions) for it.
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return 0
    return 0 if cuda_versions is None else int(cuda_versions.cudnn_get_version())


@functools.cache
def resolve(requested: str, *, dtype: str, head_dim: int, sliding_window: bool = False) -> str:
    """The kernel for `model.attention` on this device; `auto` says its choice once."""
    if requested == "xla":  # without asking the device: XLA runs everywhere
        return "xla"
    implementation, why = choose(
        requested, this_device(), dtype=dtype, head_dim=head_dim, sliding_window=sliding_window
    )
    if requested == "auto":
        if implementation == "cudnn":
            console.status("jtrain: model.attention=auto: cuDNN fused attention")
        else:
            console.status(f"jtrain: model.attention=auto: XLA attention (not cuDNN: {why})")
    return implementation


def kernel_for_call(implementation: str, *, masked: bool, length: int) -> str:
    """The kernel one call uses: the model's, except that a masked call of odd length, which
    may be differentiated, goes through XLA (decoding with a cache uses `attend_cached`)."""
    if implementation == "cudnn" and masked and length % 2:
        return "xla"
    return implementation


def validate(config) -> None:
    """Checks an explicit `model.attention=cudnn` against this device and the run's shapes."""
    m = config.model
    if m.attention != "cudnn":
        return
    window = bool(m.get("sliding_window", 0))
    choose("cudnn", this_device(), dtype=m.dtype, head_dim=m.head_dim, sliding_window=window)
    seq_len = config.train.seq_len
    if config.data.get("packing", False) and seq_len % 2:
        raise ConfigError(
            f"config.model.attention='cudnn' is invalid with data.packing and train.seq_len="
            f"{seq_len}: packed documents reach cuDNN as a mask, which it trains on only for "
            "even lengths. Use an even train.seq_len, or model.attention='auto' or 'xla'."
        )
    rules = config.get("mesh", {}).get("rules", {})
    if rules.get("head_dim", ""):
        raise ConfigError(
            f"config.model.attention='cudnn' is invalid with mesh.rules.head_dim="
            f"{rules['head_dim']!r}: cuDNN attention cannot split a head's width across devices. "
            "Set mesh.rules.head_dim='' or use model.attention='xla'."
        )


def attend(
    q_BxLxHxK: jax.Array,
    k_BxSxGxK: jax.Array,
    v_BxSxGxK: jax.Array,
    *,
    mask: jax.Array | None,
    causal: bool,
    local_window: tuple[int, int] | None,
    implementation: str,
) -> jax.Array:
    """Grouped-query attention [B, L, H, K] through the named kernel ("xla" or "cudnn")."""
    return jax.nn.dot_product_attention(
        q_BxLxHxK,
        k_BxSxGxK,
        v_BxSxGxK,
        mask=mask,
        is_causal=causal,
        local_window_size=local_window,
        # None is jax's XLA path, exactly what jtrain called before `auto` existed.
        implementation=None if implementation == "xla" else implementation,
    )


def attend_cached(
    q_BxTxHxK: jax.Array, k_BxGxKxS: jax.Array, v_BxGxSxK: jax.Array, mask_Bx1xTxS: jax.Array
) -> jax.Array:
    """Grouped-query attention [B, T, H, K] of T new queries over a KV cache kept as keys
    [B, G, K, S] and values [B, G, S, K].

    Decoding uses this on every backend rather than `dot_product_attention`, which wants keys
    and values as [B, S, G, K]: on XLA:CPU the transposes of the whole cache that this costs
    at every step and layer, and its batched dot of probabilities and values, took most of a
    batch-16 decode step. Each key head's R = H / G query heads and T queries are one [R * T]
    row block, and the cache lies as both products want it: queries [R * T, K] by keys [K, S],
    probabilities [R * T, S] by values [S, K] (keys stored [S, K] made XLA:CPU's product 3.5x
    slower at a decoding step). The arithmetic is jax's XLA path's: scores and softmax in
    float32, masked slots at a large negative value, the probabilities cast back to the
    values' dtype.
    """
    batch, steps, heads, width = q_BxTxHxK.shape
    groups, slots = v_BxGxSxK.shape[1], v_BxGxSxK.shape[2]
    per_group = heads // groups
    q_BxGxQxK = (
        q_BxTxHxK.reshape(batch, steps, groups, per_group, width)
        .transpose(0, 2, 3, 1, 4)
        .reshape(batch, groups, per_group * steps, width)
    )  # Q = R * T query rows, each key head's own
    scores_BxGxQxS = jnp.einsum(
        "bgqk,bgks->bgqs", q_BxGxQxK, k_BxGxKxS, preferred_element_type=jnp.float32
    ) * jnp.float32(width**-0.5)
    mask_Bx1xQxS = jnp.broadcast_to(
        mask_Bx1xTxS[:, :, None], (batch, 1, per_group, steps, slots)
    ).reshape(batch, 1, per_group * steps, slots)
    masked = jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max))
    scores_BxGxQxS = jnp.where(mask_Bx1xQxS, scores_BxGxQxS, masked)
    probs_BxGxQxS = jax.nn.softmax(scores_BxGxQxS, axis=-1).astype(v_BxGxSxK.dtype)
    out_BxGxQxK = jnp.einsum("bgqs,bgsk->bgqk", probs_BxGxQxS, v_BxGxSxK)
    out = out_BxGxQxK.reshape(batch, groups, per_group, steps, width).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, steps, heads, width)
