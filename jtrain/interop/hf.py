"""Hugging Face interop: Llama, Mistral, Qwen2 and GPT-2 checkpoints in and out of jtrain.

`load_model` reads a local model directory (config.json + safetensors) into a `Transformer`,
placing every tensor straight into its sharded placement when given a mesh; `save_model`
writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

One table per family (`_sources`) says which Hugging Face tensor each jtrain parameter comes
from and how its axes map onto the parameter's; loading and saving both read it. Safetensors
files are memory-mapped and their header parsed here (no pickle, no torch): numpy's safetensors
backend cannot hold bfloat16, the dtype of nearly every released checkpoint, and a memory map
reads only the pages of the slice each device needs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jtrain import mesh as mesh_lib
from jtrain.models.transformer import DTYPES, Transformer, TransformerConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# config.json keys that do not change the weights or the forward pass.
_METADATA_KEYS = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype",
    "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "tokenizer_class", "output_attentions", "output_hidden_states", "return_dict",
    # Llama's pretraining_tp > 1 splits the same matmuls into slices: identical logits.
    "pretraining_tp",
    # Training-time dropout rates: jtrain takes its own from model.dropout.
    "attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop",
    # The n_ctx of old GPT-2 configs duplicates n_positions; summary_* configure the
    # classification head of GPT2DoubleHeadsModel, which a causal LM does not have.
    "n_ctx", "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "task_specific_params",
}  # fmt: skip
_GELUS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Stored buffers that hold no parameters (older transformers versions saved them).
_BUFFER_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
)  # fmt: skip
_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
}  # fmt: skip


# --- config.json <-> TransformerConfig -------------------------------------------------------


class _Keys:
    """Reads a config.json dict, remembering which keys were understood."""

    def __init__(self, hf: Mapping):
        self.hf, self.used = hf, set(_METADATA_KEYS)

    def get(self, key: str, default=None):
        self.used.add(key)
        value = self.hf.get(key)
        return default if value is None else value

    def raw(self, key: str, default=None):
        """The value as stored: an explicit null stays None (get() gives the default for it)."""
        self.used.add(key)
        return self.hf.get(key, default)

    def need(self, key: str):
        if self.hf.get(key) is None:
            raise ValueError(f"config.json has no {key!r}, which a {self.hf['model_type']} needs")
        return self.get(key)

    def expect(self, key: str, only, default):
        value = self.get(key, default)
        if value != only:
            raise ValueError(f"config.json {key}={value!r} is not supported (only {only!r})")

    def check_all_used(self) -> None:
        unknown = sorted(set(self.hf) - self.used)
        if unknown:
            raise ValueError(
                f"config.json keys not supported by jtrain for {self.hf['model_type']}: {unknown}. "
                "They may change the model, so they are not ignored."
            )


def _rope_fields(keys: _Keys, max_len: int) -> dict:
    """RoPE theta and scaling from v4 (rope_theta, rope_scaling) or v5 (rope_parameters) keys."""
    v5, v4 = keys.get("rope_parameters"), keys.get("rope_scaling")
    rope = dict(v5 or v4 or {})
    theta = rope.pop("rope_theta", None) or keys.get("rope_theta", 10_000.0)
    kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    partial = rope.pop("partial_rotary_factor", None) or keys.get("partial_rotary_factor", 1.0)
    keys.used.update({"rope_theta", "partial_rotary_factor"})
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    fields = {"rope_theta": float(theta)}
    if kind == "linear":
        fields.update(rope_scaling="linear", rope_factor=float(rope.pop("factor")))
    elif kind == "llama3":
        fields.update(
            rope_scaling="llama3",
            rope_factor=float(rope.pop("factor")),
            rope_low_freq_factor=float(rope.pop("low_freq_factor")),
            rope_high_freq_factor=float(rope.pop("high_freq_factor")),
            rope_original_max_len=int(rope.pop("original_max_position_embeddings", max_len)),
        )
    elif kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported; supported: default, linear, llama3")
    if rope:
        raise ValueError(f"rope parameters {sorted(rope)} are not supported for type {kind!r}")
    return fields


def _sliding_window(keys: _Keys, family: str, n_layers: int) -> int:
    window = keys.raw("sliding_window", 4096)  # both configs default to 4096 when absent
    if family == "mistral":
        return int(window or 0)
    # Qwen2: layers from max_window_layers on use the window, and only with use_sliding_window.
    use, first = keys.get("use_sliding_window", False), keys.get("max_window_layers", 28)
    default_types = ["sliding" if i >= first else "full" for i in range(n_layers)]
    kinds = {t.split("_")[0] for t in keys.get("layer_types", default_types)}
    if not use or window is None or kinds == {"full"}:
        return 0
    if kinds == {"sliding"}:
        return int(window)
    raise ValueError(
        f"qwen2 with sliding-window attention in some layers only (max_window_layers={first}, "
        "layer_types) is not supported"
    )


def _llama_config(keys: _Keys, family: str) -> dict:
    d, h = keys.need("hidden_size"), keys.need("num_attention_heads")
    n_layers = keys.need("num_hidden_layers")
    keys.expect("hidden_act", "silu", "silu")
    max_len = int(keys.get("max_position_embeddings", 2048))
    qkv_bias = out_bias = mlp_bias = False
    if family == "llama":
        qkv_bias = out_bias = bool(keys.get("attention_bias", False))
        mlp_bias = bool(keys.get("mlp_bias", False))
    elif family == "qwen2":
        qkv_bias = True
    return dict(
        vocab_size=keys.need("vocab_size"),
        d_model=d,
        n_layers=n_layers,
        n_heads=h,
        n_kv_heads=keys.get("num_key_value_heads", h),
        head_dim=keys.get("head_dim", d // h),
        d_ff=keys.need("intermediate_size"),
        norm_eps=float(keys.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(keys.get("tie_word_embeddings", False)),
        max_seq_len=max_len,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=mlp_bias,
        sliding_window=_sliding_window(keys, family, n_layers) if family != "llama" else 0,
        **_rope_fields(keys, max_len),
    )


def _gpt2_config(keys: _Keys) -> dict:
    d, h = keys.need("n_embd"), keys.need("n_head")
    act = keys.get("activation_function", "gelu_new")
    if act not in _GELUS:
        raise ValueError(f"gpt2 activation_function={act!r} is not supported: {sorted(_GELUS)}")
    keys.expect("scale_attn_weights", True, True)
    keys.expect("scale_attn_by_inverse_layer_idx", False, False)
    keys.expect("reorder_and_upcast_attn", False, False)
    keys.expect("add_cross_attention", False, False)
    return dict(
        vocab_size=keys.need("vocab_size"),
        d_model=d,
        n_layers=keys.need("n_layer"),
        n_heads=h,
        n_kv_heads=h,
        head_dim=d // h,
        d_ff=keys.get("n_inner", 4 * d),
        norm_eps=float(keys.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(keys.get("tie_word_embeddings", True)),
        norm="layer",
        positions="learned",
        max_seq_len=keys.get("n_positions", 1024),
        qkv_bias=True,
        out_bias=True,
        mlp_gated=False,
        mlp_activation=_GELUS[act],
        mlp_bias=True,
    )


def config_from_hf(hf: Mapping, *, dtype: str = "float32") -> tuple[str, TransformerConfig]:
    """(family, TransformerConfig) of a Hugging Face config.json dict; unsupported -> ValueError."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(
            f"model_type {family!r} is not supported; supported: {list(ARCHITECTURES)}"
        )
    archs = hf.get("architectures") or [ARCHITECTURES[family]]
    if list(archs) != [ARCHITECTURES[family]]:
        raise ValueError(f"architectures {archs} not supported; only [{ARCHITECTURES[family]!r}]")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    keys = _Keys(hf)
    fields = _gpt2_config(keys) if family == "gpt2" else _llama_config(keys, family)
    keys.check_all_used()
    return family, TransformerConfig(**fields, dtype=dtype)


def read_config(path: str, *, dtype: str = "float32") -> tuple[str, TransformerConfig]:
    """(family, TransformerConfig) of the Hugging Face model directory at path."""
    with open(os.path.join(path, "config.json")) as f:
        return config_from_hf(json.load(f), dtype=dtype)


def _rope_json(cfg: TransformerConfig) -> dict | None:
    if cfg.rope_scaling == "none":
        return None
    if cfg.rope_scaling == "linear":
        return {"rope_type": "linear", "factor": cfg.rope_factor}
    return {
        "rope_type": "llama3",
        "factor": cfg.rope_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_len,
    }


def config_to_hf(cfg: TransformerConfig, family: str, *, max_len: int, dtype: str) -> dict:
    """The config.json of cfg as a `family` model; ValueError if the family cannot express it."""
    if family not in ARCHITECTURES:
        raise ValueError(f"family {family!r} is not supported; supported: {list(ARCHITECTURES)}")
    hf = {"architectures": [ARCHITECTURES[family]], "model_type": family, "torch_dtype": dtype}
    hf.update(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
    if family == "gpt2":
        act = {v: k for k, v in _GELUS.items() if k != "gelu_pytorch_tanh"}.get(cfg.mlp_activation)
        hf.update(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff)
        hf.update(n_positions=max_len, layer_norm_epsilon=cfg.norm_eps, activation_function=act)
    else:
        hf.update(
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            head_dim=cfg.head_dim,
            hidden_act="silu",
            max_position_embeddings=max_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            rope_scaling=_rope_json(cfg),
        )
        if family == "llama":
            hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        elif family == "mistral":
            hf.update(sliding_window=cfg.sliding_window or None)
        else:
            window = cfg.sliding_window
            hf.update(use_sliding_window=bool(window), sliding_window=window or None)
            hf.update(max_window_layers=0 if window else cfg.n_layers)
    # Whatever the family cannot express shows up as a difference when read back.
    _, back = config_from_hf(hf, dtype=cfg.dtype)
    unchanged = ("dtype", "dropout", "remat", "attention", "max_seq_len")
    for field in dataclasses.fields(cfg):
        mine, theirs = getattr(cfg, field.name), getattr(back, field.name)
        if field.name not in unchanged and mine != theirs:
            raise ValueError(f"a {family} model cannot have model.{field.name}={mine!r}")
    return hf


# --- the tensor table ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
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


def _linear(name: str, out: tuple[int, ...], inp: tuple[int, ...]) -> _Source:
    """A torch Linear weight [out, in]: jtrain keeps it as [*in, *out]."""
    n_out = len(out)
    perm = tuple(range(n_out, n_out + len(inp))) + tuple(range(n_out))
    return _Source(name, (math.prod(out), math.prod(inp)), (*out, *inp), perm)


def _flat(name: str, view: tuple[int, ...], columns=None, total: int | None = None) -> _Source:
    """A stored vector (a bias, a norm scale) viewed as `view`."""
    return _Source(name, (total or math.prod(view),), view, columns=columns)


def _llama_sources(cfg: TransformerConfig) -> dict[str, _Source]:
    d, h, g, k, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                        cfg.vocab_size)  # fmt: skip
    a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    table = {
        "embed_VxD": _Source("model.embed_tokens.weight", (v, d), (v, d)),
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
    if not cfg.tie_embeddings:
        table["unembed_DxV"] = _linear("lm_head.weight", (v,), (d,))
    return table


def _gpt2_sources(cfg: TransformerConfig, prefix: str) -> dict[str, _Source]:
    d, h, k, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    b = prefix + "h.{i}."
    # GPT-2's Conv1D stores weights as [in, out], jtrain's layout: no transposes.
    table = {
        "embed_VxD": _Source(prefix + "wte.weight", (v, d), (v, d)),
        "pos_embed_LxD": _Source(prefix + "wpe.weight", (cfg.max_seq_len, d), (cfg.max_seq_len, d)),
        "final_norm.scale": _flat(prefix + "ln_f.weight", (d,)),
        "final_norm.bias": _flat(prefix + "ln_f.bias", (d,)),
        "blocks.attn_norm.scale": _flat(b + "ln_1.weight", (d,)),
        "blocks.attn_norm.bias": _flat(b + "ln_1.bias", (d,)),
        "blocks.mlp_norm.scale": _flat(b + "ln_2.weight", (d,)),
        "blocks.mlp_norm.bias": _flat(b + "ln_2.bias", (d,)),
        "blocks.attn.o_HxKxD": _Source(b + "attn.c_proj.weight", (d, d), (h, k, d)),
        "blocks.attn.o_bias_D.bias": _flat(b + "attn.c_proj.bias", (d,)),
        "blocks.mlp.up_DxF": _Source(b + "mlp.c_fc.weight", (d, f), (d, f)),
        "blocks.mlp.up_bias_F.bias": _flat(b + "mlp.c_fc.bias", (f,)),
        "blocks.mlp.down_FxD": _Source(b + "mlp.c_proj.weight", (f, d), (f, d)),
        "blocks.mlp.down_bias_D.bias": _flat(b + "mlp.c_proj.bias", (d,)),
    }
    for j, (w, bias) in enumerate([("q_DxHxK", "q_bias_HxK"), ("k_DxGxK", "k_bias_GxK"),
                                   ("v_DxGxK", "v_bias_GxK")]):  # fmt: skip
        cols = (j * d, (j + 1) * d)
        table["blocks.attn." + w] = _Source(
            b + "attn.c_attn.weight", (d, 3 * d), (d, h, k), None, cols
        )
        table["blocks.attn." + bias + ".bias"] = _flat(b + "attn.c_attn.bias", (h, k), cols, 3 * d)
    if not cfg.tie_embeddings:
        table["unembed_DxV"] = _linear("lm_head.weight", (v,), (d,))
    return table


def _sources(family: str, cfg: TransformerConfig, prefix: str = "") -> dict[str, _Source]:
    return _gpt2_sources(cfg, prefix) if family == "gpt2" else _llama_sources(cfg)


# --- reading ---------------------------------------------------------------------------------


class _Checkpoint:
    """The tensors of a Hugging Face model directory by name, memory-mapped, never unpickled."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"{path} has no model.safetensors or model.safetensors.index.json; pickled "
                "(.bin/.pt) checkpoints are not read: convert them to safetensors first."
            )
        self.tensors: dict[str, np.ndarray] = {}
        for name in files:
            self.tensors.update(_map_safetensors(os.path.join(path, name)))

    def read(self, src: _Source, layer: int | None, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` (jtrain layout) of one layer's parameter, reading only that block."""
        stored = self.tensors[src.name.format(i=layer)]
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


def _map_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped views of every tensor in one .safetensors file."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data = np.memmap(path, np.uint8, mode="r", offset=8 + header_len) if header else None
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        tensors[name] = data[begin:end].view(dtype).reshape(info["shape"])
    return tensors


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


def _check_tensors(ckpt: _Checkpoint, table: dict[str, _Source], n_layers: int, tied: bool):
    """Every tensor the table names exists with its shape, and no stored tensor is left over."""
    expected = {}
    for src in table.values():
        names = [src.name.format(i=i) for i in range(n_layers)] if "{i}" in src.name else [src.name]
        expected.update({name: src.shape for name in names})
    problems = [
        f"{name}: missing"
        if name not in ckpt.tensors
        else f"{name}: {ckpt.tensors[name].shape} but the config says {shape}"
        for name, shape in expected.items()
        if name not in ckpt.tensors or tuple(ckpt.tensors[name].shape) != shape
    ]
    # A tied model's lm_head.weight, when stored, is the embedding again.
    ignorable = {"lm_head.weight"} if tied else set()
    problems += [
        f"{name}: unexpected"
        for name in ckpt.tensors
        if name not in expected and name not in ignorable and not name.endswith(_BUFFER_SUFFIXES)
    ]
    if problems:
        raise ValueError("checkpoint does not match config.json:\n  " + "\n  ".join(problems[:20]))


def _normalise(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _aligned_empty(shape: list[int], dtype) -> np.ndarray:
    """np.empty, 64-byte aligned: XLA:CPU then adopts the buffer instead of copying it."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _build(ckpt: _Checkpoint, src: _Source, shape, dtype, sharding, stacked: bool) -> jax.Array:
    """One parameter, each device's shard read from the files on its own (replicas read once)."""
    blocks: dict[tuple, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        index = _normalise(index, shape)
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:
            out = _aligned_empty([s.stop - s.start for s in index], dtype)
            if not stacked:
                out[...] = ckpt.read(src, None, index)
            for j, layer in enumerate(range(index[0].start, index[0].stop) if stacked else []):
                out[j] = ckpt.read(src, layer, index[1:])
            blocks[key] = out
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, shard)


def load_params(path: str, abstract_params: nnx.State, shardings=None) -> nnx.State:
    """Parameters of the Hugging Face model at path, shaped, typed and placed like the given
    abstract ones (`shardings`: a matching tree of NamedShardings; None = the first device).
    """
    with open(os.path.join(path, "config.json")) as f:
        family, cfg = config_from_hf(json.load(f))
    ckpt = _Checkpoint(path)
    prefix = "transformer." if family == "gpt2" and "transformer.wte.weight" in ckpt.tensors else ""
    table = _sources(family, cfg, prefix)
    _check_tensors(ckpt, table, cfg.n_layers, cfg.tie_embeddings)
    if shardings is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_params)

    def load(path_keys, abstract, sharding):
        name = ".".join(str(k.key) for k in path_keys if isinstance(k, jax.tree_util.DictKey))
        if name not in table:
            raise ValueError(f"the model has a parameter {name} that a {family} checkpoint lacks")
        src, stacked = table.pop(name), name.startswith("blocks.")
        expected = ((cfg.n_layers,) if stacked else ()) + tuple(src.view[a] for a in src.axes)
        if tuple(abstract.shape) != expected:
            raise ValueError(f"{name}: the model has shape {abstract.shape}, {path} {expected}")
        return _build(ckpt, src, abstract.shape, abstract.dtype, sharding, stacked)

    # Parameters are built on a few threads: numpy's copies release the GIL.
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        futures = jax.tree_util.tree_map_with_path(
            lambda *args: pool.submit(load, *args), abstract_params, shardings
        )
        params = jax.tree.map(lambda future: future.result(), futures)
    if table:
        raise ValueError(f"the model lacks parameters the checkpoint has: {sorted(table)}")
    return params


def load_model(
    path: str,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh: Mesh | None = None,
    rules: mesh_lib.Rules | None = None,
) -> Transformer:
    """A Transformer with the weights of the Hugging Face model directory at path.

    dtype is the compute dtype, param_dtype the one parameters are stored in. With a mesh
    (and the logical-axis rules), every tensor is read straight into its sharded placement.
    """
    _, cfg = read_config(path, dtype=dtype)
    if param_dtype not in DTYPES:
        raise ValueError(f"param_dtype={param_dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, DTYPES[param_dtype]), abstract)
    shardings = None
    if mesh is not None:
        if rules is None:
            raise ValueError(
                "load_model(mesh=...) needs rules= (mesh.parse_rules(config.mesh.rules))"
            )
        shardings = mesh_lib.tree_shardings(abstract, mesh, rules)
    return nnx.merge(graphdef, load_params(path, abstract, shardings))


# --- writing ---------------------------------------------------------------------------------


def _infer_family(cfg: TransformerConfig) -> str:
    if cfg.positions == "learned":
        return "gpt2"
    if cfg.qkv_bias and not cfg.out_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def _hf_tensors(params: dict[str, jax.Array], table: dict[str, _Source], n_layers: int, dtype):
    """(name, shape, make) for every stored tensor; make() gathers and lays out just that one."""
    by_name: dict[str, list[tuple[str, _Source, int | None]]] = {}
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


def _write_safetensors(path: str, tensors, dtype: np.dtype) -> None:
    """Writes one safetensors file, gathering one tensor at a time (memory stays bounded)."""
    st_dtype = {v: k for k, v in _ST_DTYPES.items()}[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": st_dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, _, make in tensors:
            f.write(np.ascontiguousarray(make()).reshape(-1).view(np.uint8).data)


def _write_shards(path: str, tensors, dtype: np.dtype, max_shard_bytes: int) -> None:
    """model.safetensors, or numbered shards of at most max_shard_bytes and their index."""
    shards, size = [[]], 0
    for tensor in tensors:
        nbytes = math.prod(tensor[1]) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    if len(shards) == 1:
        _write_safetensors(os.path.join(path, "model.safetensors"), shards[0], dtype)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(path, name), shard, dtype)
        weight_map.update({tensor[0]: name for tensor in shard})
    total = sum(math.prod(t[1]) for t in tensors) * dtype.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def save_model(
    model: Transformer,
    path: str,
    *,
    family: str | None = None,
    dtype: str = "float32",
    max_position_embeddings: int | None = None,
    max_shard_bytes: int = 4 << 30,
    tokenizer_dir: str | None = None,
) -> None:
    """Writes model as a Hugging Face directory (config.json, safetensors, tokenizer files).

    family (llama | mistral | qwen2 | gpt2) defaults to the one the model's options match;
    max_position_embeddings defaults to model.max_seq_len; tokenizer files are copied from
    tokenizer_dir when given. path must not exist or be empty: nothing is overwritten.
    """
    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(f"{path} is not empty; save_model writes only to a new directory")
    cfg = model.cfg
    family = family or _infer_family(cfg)
    max_len = max_position_embeddings or cfg.max_seq_len
    if not max_len:
        raise ValueError("model.max_seq_len is 0: pass max_position_embeddings= to save_model")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    if family == "gpt2" and max_len != cfg.max_seq_len:
        raise ValueError(f"gpt2 stores a position table of model.max_seq_len={cfg.max_seq_len}")
    hf_config = config_to_hf(cfg, family, max_len=max_len, dtype=dtype)
    np_dtype = np.dtype(DTYPES[dtype])
    params = {
        ".".join(map(str, keys)): v.get_value()
        for keys, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    prefix = "transformer." if family == "gpt2" else ""
    tensors = _hf_tensors(params, _sources(family, cfg, prefix), cfg.n_layers, np_dtype)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    _write_shards(path, tensors, np_dtype, max_shard_bytes)
    for name in _TOKENIZER_FILES if tokenizer_dir else ():
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(path, name))
