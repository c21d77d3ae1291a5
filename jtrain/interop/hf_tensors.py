"""Which Hugging Face tensor each jtrain parameter is, and how its axes map, per family.

One table per family (`sources`) says which stored tensor each jtrain parameter comes from
and how its axes map onto the parameter's; loading (`read_block`, `check_tensors`) and saving
(`stored_tensors`) both read it, so the two directions cannot disagree. The trunk's entries
are the family's; the head's (`HEAD_PARAMS`) are the same for every family: a causal LM's
untied `lm_head`, or a sequence classifier's `score`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import numpy as np

from jtrain.errors import DataError
from jtrain.interop.safetensors_io import Tensor
from jtrain.models.transformer import HEAD_PARAMS as _HEAD_PARAMS
from jtrain.models.transformer import TransformerConfig

# Stored buffers that hold no parameters (older transformers versions saved them).
_BUFFER_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


@dataclasses.dataclass(frozen=True)
class Source:
    """One jtrain parameter (one layer's slice of it if `name` has {i}) in a Hugging Face tensor.

    The stored tensor (of `shape`; only its `columns` of the last axis if given, GPT-2's fused
    c_attn) is viewed as `view` (a reshape) and transposed by `perm` to the jtrain layout.
    """

    name: str
    shape: tuple[int, ...]
    view: tuple[int, ...]
    perm: tuple[int, ...] | None = None
    columns: tuple[int, int] | None = None

    @property
    def axes(self) -> tuple[int, ...]:
        return self.perm or tuple(range(len(self.view)))


def _linear(name: str, out: tuple[int, ...], inp: tuple[int, ...]) -> Source:
    """A torch Linear weight [out, in]: jtrain keeps it as [*in, *out]."""
    n_out = len(out)
    perm = tuple(range(n_out, n_out + len(inp))) + tuple(range(n_out))
    return Source(name, (math.prod(out), math.prod(inp)), (*out, *inp), perm)


def _flat(name: str, view: tuple[int, ...], columns=None, total: int | None = None) -> Source:
    """A stored vector (a bias, a norm scale) viewed as `view`."""
    return Source(name, (total or math.prod(view),), view, columns=columns)


def _llama_sources(cfg: TransformerConfig) -> dict[str, Source]:
    d, h, g, k, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                        cfg.vocab_size)  # fmt: skip
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    table = {
        "embed_VxD": Source("model.embed_tokens.weight", (v, d), (v, d)),
        "final_norm.scale": _flat("model.norm.weight", (d,)),
        "blocks.attn_norm.scale": _flat("model.layers.{i}.input_layernorm.weight", (d,)),
        "blocks.mlp_norm.scale": _flat("model.layers.{i}.post_attention_layernorm.weight", (d,)),
        "blocks.attn.q_DxHxK": _linear(a + "q_proj.weight", (h, k), (d,)),
        "blocks.attn.k_DxGxK": _linear(a + "k_proj.weight", (g, k), (d,)),
        "blocks.attn.v_DxGxK": _linear(a + "v_proj.weight", (g, k), (d,)),
        "blocks.attn.o_HxKxD": _linear(a + "o_proj.weight", (d,), (h, k)),
        "blocks.mlp.gate_DxF": _linear(m + "gate_proj.weight", (f,), (d,)),
        "blocks.mlp.up_DxF": _linear(m + "up_proj.weight", (f,), (d,)),
        "blocks.mlp.down_FxD": _linear(m + "down_proj.weight", (d,), (f,)),
    }
    if cfg.qkv_bias:
        table["blocks.attn.q_bias_HxK.bias"] = _flat(a + "q_proj.bias", (h, k))
        table["blocks.attn.k_bias_GxK.bias"] = _flat(a + "k_proj.bias", (g, k))
        table["blocks.attn.v_bias_GxK.bias"] = _flat(a + "v_proj.bias", (g, k))
    if cfg.out_bias:
        table["blocks.attn.o_bias_D.bias"] = _flat(a + "o_proj.bias", (d,))
    if cfg.mlp_bias:
        table["blocks.mlp.gate_bias_F.bias"] = _flat(m + "gate_proj.bias", (f,))
        table["blocks.mlp.up_bias_F.bias"] = _flat(m + "up_proj.bias", (f,))
        table["blocks.mlp.down_bias_D.bias"] = _flat(m + "down_proj.bias", (d,))
    return table


def _gpt2_sources(cfg: TransformerConfig, prefix: str) -> dict[str, Source]:
    d, h, k, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    b = prefix + "h.{i}."
    # GPT-2's Conv1D stores weights as [in, out], jtrain's layout: no transposes.
    table = {
        "embed_VxD": Source(prefix + "wte.weight", (v, d), (v, d)),
        "pos_embed_LxD": Source(prefix + "wpe.weight", (cfg.max_seq_len, d), (cfg.max_seq_len, d)),
        "final_norm.scale": _flat(prefix + "ln_f.weight", (d,)),
        "final_norm.bias": _flat(prefix + "ln_f.bias", (d,)),
        "blocks.attn_norm.scale": _flat(b + "ln_1.weight", (d,)),
        "blocks.attn_norm.bias": _flat(b + "ln_1.bias", (d,)),
        "blocks.mlp_norm.scale": _flat(b + "ln_2.weight", (d,)),
        "blocks.mlp_norm.bias": _flat(b + "ln_2.bias", (d,)),
        "blocks.attn.o_HxKxD": Source(b + "attn.c_proj.weight", (d, d), (h, k, d)),
        "blocks.attn.o_bias_D.bias": _flat(b + "attn.c_proj.bias", (d,)),
        "blocks.mlp.up_DxF": Source(b + "mlp.c_fc.weight", (d, f), (d, f)),
        "blocks.mlp.up_bias_F.bias": _flat(b + "mlp.c_fc.bias", (f,)),
        "blocks.mlp.down_FxD": Source(b + "mlp.c_proj.weight", (f, d), (f, d)),
        "blocks.mlp.down_bias_D.bias": _flat(b + "mlp.c_proj.bias", (d,)),
    }
    for j, (w, bias) in enumerate([("q_DxHxK", "q_bias_HxK"), ("k_DxGxK", "k_bias_GxK"),
                                   ("v_DxGxK", "v_bias_GxK")]):  # fmt: skip
        cols = (j * d, (j + 1) * d)
        table["blocks.attn." + w] = Source(
            b + "attn.c_attn.weight", (d, 3 * d), (d, h, k), None, cols
        )
        table["blocks.attn." + bias + ".bias"] = _flat(b + "attn.c_attn.bias", (h, k), cols, 3 * d)
    return table


def _head_sources(cfg: TransformerConfig, head: str, outputs: int) -> dict[str, Source]:
    """The head's parameters: stored outside the trunk's prefix, the same in every family."""
    if head == "scores":
        return {"score_DxO": _linear("score.weight", (outputs,), (cfg.d_model,))}
    if cfg.tie_embeddings:
        return {}  # the LM head is the embedding
    return {"unembed_DxV": _linear("lm_head.weight", (cfg.vocab_size,), (cfg.d_model,))}


# Every parameter a head may have: the rest of a model is its trunk.
HEAD_PARAMS = _HEAD_PARAMS


def sources(
    family: str, cfg: TransformerConfig, prefix: str = "", head: str = "logits", outputs: int = 1
) -> dict[str, Source]:
    """jtrain parameter name -> Source for a `family` model with `head` (logits | scores, of
    `outputs` labels); prefix: GPT-2's "transformer."."""
    trunk = _gpt2_sources(cfg, prefix) if family == "gpt2" else _llama_sources(cfg)
    return {**trunk, **_head_sources(cfg, head, outputs)}


def read_block(
    tensors: Mapping[str, np.ndarray], src: Source, layer: int | None, index: tuple[slice, ...]
) -> np.ndarray:
    """The block `index` (jtrain layout) of one layer's parameter, reading only that block."""
    stored = tensors[src.name.format(i=layer)]
    if src.columns is not None:
        stored = stored[..., src.columns[0] : src.columns[1]]
    view_index = [slice(None)] * len(src.view)
    for j, axis in enumerate(src.axes):
        view_index[axis] = index[j]
    # Each stored axis is split into consecutive view axes; slice the stored tensor by the
    # first of them (contiguous rows), the rest after the reshape.
    outer, block_shape, inner = [], [], []
    for axes in _axis_groups(stored.shape, src.view):
        first, rest = view_index[axes[0]], math.prod(src.view[a] for a in axes[1:])
        outer.append(slice(first.start * rest, first.stop * rest))
        block_shape += [first.stop - first.start] + [src.view[a] for a in axes[1:]]
        inner += [slice(None)] + [view_index[a] for a in axes[1:]]
    block = stored[tuple(outer)].reshape(block_shape)[tuple(inner)]
    return block.transpose(src.axes)


def _axis_groups(stored: tuple[int, ...], view: tuple[int, ...]) -> list[list[int]]:
    groups, axis = [], 0
    for size in stored:
        group, prod = [axis], view[axis]
        axis += 1
        while prod < size:
            group.append(axis)
            prod *= view[axis]
            axis += 1
        groups.append(group)
    return groups


def check_tensors(
    tensors: Mapping[str, np.ndarray],
    table: dict[str, Source],
    n_layers: int,
    tied: bool,
    path: str,
) -> None:
    """Every tensor the table names exists with its shape, and no stored tensor is left over;
    a DataError names the model directory `path` and the first few that do not fit."""
    expected = {}
    for src in table.values():
        names = [src.name.format(i=i) for i in range(n_layers)] if "{i}" in src.name else [src.name]
        expected.update({name: src.shape for name in names})
    problems = [
        f"{name}: missing"
        if name not in tensors
        else f"{name}: {tensors[name].shape} but the config says {shape}"
        for name, shape in expected.items()
        if name not in tensors or tuple(tensors[name].shape) != shape
    ]
    # A tied model's lm_head.weight, when stored, is the embedding again.
    ignorable = {"lm_head.weight"} if tied else set()
    problems += [
        f"{name}: unexpected"
        for name in tensors
        if name not in expected and name not in ignorable and not name.endswith(_BUFFER_SUFFIXES)
    ]
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError(
            f"{path}: the weights do not match config.json: {'; '.join(problems[:5])}{more}"
        )


def stored_tensors(
    params: dict[str, jax.Array], table: dict[str, Source], n_layers: int, dtype: np.dtype
) -> list[Tensor]:
    """(name, shape, make) for every stored tensor; make() gathers and lays out just that one."""
    by_name: dict[str, list[tuple[str, Source, int | None]]] = {}
    for param, src in table.items():
        layers = range(n_layers) if param.startswith("blocks.") else [None]
        for layer in layers:
            by_name.setdefault(src.name.format(i=layer), []).append((param, src, layer))

    def make(parts) -> Callable[[], np.ndarray]:
        def tensor():
            pieces = []
            for param, src, layer in sorted(parts, key=lambda p: p[1].columns or (0, 0)):
                value = params[param] if layer is None else params[param][layer]
                host = np.asarray(jax.device_get(value)).transpose(np.argsort(src.axes))
                pieces.append(host.reshape(*src.shape[:-1], -1))
            return np.concatenate(pieces, axis=-1).astype(dtype)

        return tensor

    return [(name, parts[0][1].shape, make(parts)) for name, parts in by_name.items()]
