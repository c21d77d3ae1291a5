"""LoRA: low-rank adapters on a frozen base, their merge into the base, and an int8 base.

`attach(model, cfg, rngs)` gives every projection kernel whose name matches `cfg.targets` an
adapter: a kernel W [in..., out...] gets A [in..., r] (small random init) and B [r, out...]
(zeros), so the attached model starts equal to the base, and its output becomes
x @ W + (alpha / r) * dropout(x) @ A @ B — two thin matmuls, W + A B is never formed while
training. Adapters are `LoRAParam`s, so one filter splits a model into what trains (the
adapters) and what stays frozen (the rest); they carry the kernel's logical axis names (the
rank axis replicated), so their shardings are derived like every other parameter's.

Kernels are those a module lists in its `KERNELS` table (jtrain.models.layers: Attention and
MLP); the module applies its adapters through `layers.project`. Blocks stacked along a
"layers" axis get stacked adapters. `merge(model)` folds the adapters into the kernels and
returns a plain model (Hugging Face export, serving). With `base_dtype="int8"` the frozen
kernels are stored as int8 with per-output-channel scales and dequantized one block at a time
inside the scan (QLoRA-style); "bfloat16" stores every frozen parameter in bfloat16.

Shape suffixes: I the kernel's contracted (input) dims, O its output dims, R the rank.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jtrain.models import int8, layers
from jtrain.validation import one_of, require

BASE_DTYPES = ("float32", "bfloat16", "int8")
# Projection kernels an adapter can target, by short name ("q" for Attention.q_DxHxK).
KERNEL_MODULES = {"attn": layers.Attention, "mlp": layers.MLP}
KERNEL_NAMES = tuple(name for cls in KERNEL_MODULES.values() for name in cls.KERNELS)
TARGET_NAMES = tuple(name.split("_")[0] for name in KERNEL_NAMES)


class LoRAParam(nnx.Param):
    """A trainable adapter matrix; every other parameter of a LoRA model is frozen."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The `model.lora` settings; rank 0 means no adapters (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    base_dtype: str = "float32"

    @classmethod
    def from_config(cls, model_config) -> LoRAConfig:
        """From `config.model.lora`; a config without that block means no LoRA."""
        block = model_config.get("lora") if hasattr(model_config, "get") else None
        if block is None:
            return cls()
        return cls(
            rank=int(block.rank),
            alpha=float(block.alpha),
            dropout=float(block.dropout),
            targets=parse_targets(block.targets),
            base_dtype=str(block.base_dtype),
        )

    @property
    def trainable(self) -> nnx.filterlib.Filter:
        """The filter of the parameters that get gradients and optimizer state."""
        return LoRAParam if self.rank > 0 else nnx.Param


def validate(config) -> None:
    """Checks the `model.lora.*` keys; ConfigError names the first bad one."""
    lora_cfg = config.model.get("lora")
    if lora_cfg is None:  # a config written before LoRA existed: no adapters
        return
    rank, alpha, dropout = lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout
    require(isinstance(rank, int) and rank >= 0, "model.lora.rank", rank, "must be >= 0 (0 = off)")
    require(alpha > 0, "model.lora.alpha", alpha, "must be positive (the scale is alpha / rank)")
    require(0.0 <= dropout < 1.0, "model.lora.dropout", dropout, "must be in [0, 1)")
    targets = parse_targets(lora_cfg.targets)
    unknown = unmatched_targets(targets)
    require(
        bool(targets) and not unknown,
        "model.lora.targets",
        lora_cfg.targets,
        f"{', '.join(unknown) or 'it'} matches no kernel; give comma-separated names or glob "
        f"patterns over {', '.join(TARGET_NAMES)} (or attn.q, mlp.up, ...), or 'all'",
    )
    one_of("model.lora.base_dtype", lora_cfg.base_dtype, BASE_DTYPES)
    require(
        rank > 0 or lora_cfg.base_dtype == "float32",
        "model.lora.base_dtype",
        lora_cfg.base_dtype,
        "needs model.lora.rank > 0: only a frozen base is stored in a lower precision",
    )


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """ "q,v" -> ("q", "v"); "all" -> every target name."""
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",")]
    patterns = tuple(s for s in spec if s)
    return TARGET_NAMES if patterns == ("all",) else patterns


def _qualified(module_key: str, kernel: str) -> tuple[str, str]:
    """("q", "attn.q") for Attention's q_DxHxK: the names a target pattern may match."""
    short = kernel.split("_")[0]
    return short, f"{module_key}.{short}"


def unmatched_targets(targets: Sequence[str]) -> list[str]:
    """Patterns that match no projection kernel (a typo in model.lora.targets)."""
    names = [
        n
        for key, cls in KERNEL_MODULES.items()
        for kernel in cls.KERNELS
        for n in _qualified(key, kernel)
    ]
    return [t for t in targets if not fnmatch.filter(names, t)]


def _is_target(path: tuple, kernel: str, targets: Sequence[str]) -> bool:
    module_key = str(path[-1]) if path else ""
    names = _qualified(module_key, kernel)
    return any(fnmatch.fnmatchcase(n, t) for n in names for t in targets)


class Adapter(nnx.Module):
    """The low-rank update (alpha / r) * dropout(x) @ A @ B of one kernel."""

    def __init__(self, kernel: nnx.Param, contract: int, cfg: LoRAConfig, *, salt: int, rngs):
        shape, axes = kernel.shape, int8.axes_of(kernel)
        lead = int8.lead_axes(axes)
        split = lead + contract
        fan_in = math.prod(shape[lead:split])
        a_shape = (*shape[:split], cfg.rank)
        a = fan_in**-0.5 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, a_shape)
        b = jnp.zeros((*shape[:lead], cfg.rank, *shape[split:]), jnp.float32)
        # The rank axis is small: replicated (None), while the kernel's own axes keep their
        # names, so A is split like W's input and B like W's output.
        self.a_IxR = LoRAParam(a, out_sharding=(*axes[:split], None), eager_sharding=False)
        self.b_RxO = LoRAParam(
            b, out_sharding=(*axes[:lead], None, *axes[split:]), eager_sharding=False
        )
        self.contract = contract
        self.scaling = cfg.alpha / cfg.rank
        self.dropout = cfg.dropout
        self.salt = salt  # a per-kernel dropout stream: q, k and v share their input x

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        if dropout_rng is not None:
            dropout_rng = jax.random.fold_in(dropout_rng, self.salt)
        x = layers.dropout(x, self.dropout, dropout_rng)
        h_xR = layers.dense(x, self.a_IxR[...], contract=self.contract)
        return self.scaling * layers.dense(h_xR, self.b_RxO[...])

    def delta(self) -> jax.Array:
        """(alpha / r) * A @ B in the kernel's shape (stacked dims included)."""
        a, b = self.a_IxR[...], self.b_RxO[...]
        lead = a.ndim - 1 - self.contract
        a_2d = a.reshape(*a.shape[:lead], -1, a.shape[-1])
        b_2d = b.reshape(*b.shape[: lead + 1], -1)
        out = self.scaling * jnp.matmul(a_2d, b_2d, precision=jax.lax.Precision.HIGHEST)
        return out.reshape(*a.shape[:-1], *b.shape[lead + 1 :])


class Adapters(nnx.Module):
    """A module's adapters, one attribute per kernel name (e.g. `q_DxHxK`)."""

    def __init__(self, adapters: dict[str, Adapter]):
        for name, adapter in adapters.items():
            setattr(self, name, adapter)

    def get(self, name: str) -> Adapter | None:
        return getattr(self, name, None)


def _kernel_modules(model: nnx.Module):
    """(path, module) of every module that lists projection kernels."""
    for path, module in nnx.iter_modules(model):
        if hasattr(module, "KERNELS") and hasattr(module, "lora"):
            yield path, module


def attach(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Adds adapters to the targeted kernels and stores the frozen base in cfg.base_dtype.

    Changes `model` in place and returns it; rank 0 leaves it as it is.
    """
    if cfg.rank == 0:
        return model
    for path, module in list(_kernel_modules(model)):
        adapters = {}
        for name, contract in module.KERNELS.items():
            kernel = getattr(module, name)
            if kernel is not None and _is_target(path, name, cfg.targets):
                salt = zlib.crc32(name.encode())
                adapters[name] = Adapter(kernel, contract, cfg, salt=salt, rngs=rngs)
        if adapters:
            module.lora = Adapters(adapters)
    if cfg.base_dtype == "int8":
        int8.quantize_kernels(model)
    elif cfg.base_dtype == "bfloat16":
        base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
        nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), base))
    return model


def adapters_off(model: nnx.Module) -> nnx.Module:
    """The model with every adapter zeroed: its frozen base, without a second copy of the
    weights (a preference reference inside a traced loss). Without adapters, the model."""
    graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)
    return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, adapters), rest)


def merge(model: nnx.Module) -> nnx.Module:
    """A copy of model with every adapter folded into its kernel (W + alpha/r A B, float32)
    and int8 kernels dequantized: a plain model with the adapted model's outputs."""
    merged = nnx.clone(model)
    for _, module in list(_kernel_modules(merged)):
        adapters = module.lora
        for name in module.KERNELS:
            kernel = getattr(module, name)
            if kernel is None:
                continue
            adapter = adapters.get(name) if adapters is not None else None
            if adapter is None and not isinstance(kernel, int8.Int8Kernel):
                continue
            axes = kernel.axes if isinstance(kernel, int8.Int8Kernel) else int8.axes_of(kernel)
            w = kernel[...].astype(jnp.float32)
            if adapter is not None:
                w = w + adapter.delta()
            setattr(module, name, nnx.Param(w, out_sharding=axes, eager_sharding=False))
        module.lora = None
    return merged
