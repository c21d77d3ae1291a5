"""Weight-only int8: kernels stored as int8 values with float32 per-channel scales.

Used for a LoRA run's frozen base (`model.lora.base_dtype=int8`) and for serving
(`quantize`, `--quantize=int8`). An `Int8Kernel` reads like the parameter it replaces
(`kernel[...]` dequantizes), so layers use it unchanged; inside the scanned block stack that
happens one layer at a time, and the embedding table is dequantized where it is read.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Quantized(nnx.Variable):
    """A frozen array that is not a float parameter: int8 kernel values and their scales."""


def axes_of(param: nnx.Variable) -> tuple:
    """The logical axis names a parameter was created with."""
    return tuple(param.get_metadata()["out_sharding"])


def lead_axes(axes: Sequence) -> int:
    """Leading stacked axes (blocks stacked by nnx.vmap are named "layers")."""
    lead = 0
    while lead < len(axes) and axes[lead] == "layers":
        lead += 1
    return lead


class Int8Kernel(nnx.Module):
    """A frozen kernel as int8 values and float32 scales, one per output channel (symmetric).

    `kernel[...]` dequantizes, as a Param's `[...]` reads it, so modules use it unchanged;
    inside the block scan that happens for one layer at a time.
    """

    def __init__(self, kernel: nnx.Param, contract: int, *, per_row: bool = False):
        """`contract` leading dims (after stacked layers) are the input; each output channel
        gets a scale. per_row: one scale per row instead (an embedding read by token)."""
        w, axes = kernel[...].astype(jnp.float32), axes_of(kernel)
        lead = lead_axes(axes)
        reduced = tuple(range(lead + 1, w.ndim)) if per_row else tuple(range(lead, lead + contract))
        scale = jnp.max(jnp.abs(w), axis=reduced, keepdims=True) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays exactly zero
        values = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
        self.values = Quantized(values, out_sharding=axes, eager_sharding=False)
        scale_axes = tuple(None if d in reduced else a for d, a in enumerate(axes))
        self.scale = Quantized(scale, out_sharding=scale_axes, eager_sharding=False)
        self.axes = axes

    def __getitem__(self, index) -> jax.Array:
        return (self.values[...].astype(jnp.float32) * self.scale[...])[index]


def _kernel_modules(model: nnx.Module):
    """Every module that lists projection kernels (attention, MLP)."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "KERNELS"):
            yield module


def quantize_kernels(model: nnx.Module) -> nnx.Module:
    """Replaces every projection kernel by an Int8Kernel, in place."""
    for module in list(_kernel_modules(model)):
        for name, contract in module.KERNELS.items():
            kernel = getattr(module, name)
            if isinstance(kernel, nnx.Param):
                setattr(module, name, Int8Kernel(kernel, contract))
    return model


# Tables outside the projection kernels, and the dims their scales run along: the embedding
# is read by rows (one scale per token), the untied output projection by output columns.
_TABLES = {"embed_VxD": 1, "unembed_DxV": 1}


def quantize(model: nnx.Module) -> nnx.Module:
    """Post-training weight-only int8 of a whole model, in place: the projection kernels and
    the embedding tables (norms and biases, a few per cent of the bytes, stay float32)."""
    quantize_kernels(model)
    for name, contract in _TABLES.items():
        table = getattr(model, name, None)
        if isinstance(table, nnx.Param):
            setattr(model, name, Int8Kernel(table, contract, per_row=name == "embed_VxD"))
    return model


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every array of the model's state (what serving holds in memory)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
