"""Hugging Face interop: Llama, Mistral, Qwen2 and GPT-2 checkpoints in and out of jtrain.

`load_model` reads a local model directory (config.json + safetensors) into a `Transformer`,
placing every tensor straight into its sharded placement when given a mesh; `save_model`
writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads. A `Scorer`
(a reward model: the trunk with a one-output score head) goes both ways as the family's
`...ForSequenceClassification` (`AutoModelForSequenceClassification`), the head being the only
difference. This module owns those entry points and the placement of parameters on devices;
the config.json mapping is in `hf_config`, the per-family tensor table in `hf_tensors`, the
file format in `safetensors_io`.

PAD and a sequence classifier: transformers reads each sequence's score at its last token
that is not `pad_token_id` (jtrain reads it at the sequence's length). When PAD == EOS, a
sequence ending in EOS (as every jtrain preference sequence does) is read one token early by
transformers. `save_model` writes the tokenizer's own PAD id, and warns when it equals EOS:
then give the tokenizer a PAD token of its own, and set config.json's `pad_token_id` to it
(any id below vocab_size that inputs never contain: padding follows the last real token, so
causal attention never reads it).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import shutil
import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jtrain import mesh as mesh_lib
from jtrain.interop import hf_tensors, safetensors_io
from jtrain.interop.hf_config import (
    ARCHITECTURES,
    config_from_hf,
    config_to_hf,
    head_of,
    infer_family,
    read_config_json,
)
from jtrain.models.transformer import DTYPES, HEADS, Decoder, TransformerConfig

__all__ = [
    "ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "head_of",
    "load_model",
    "load_params",
    "model_head",
    "read_config",
    "save_model",
]

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
)  # fmt: skip


def read_config(path: str, *, dtype: str = "float32") -> tuple[str, TransformerConfig]:
    """(family, TransformerConfig) of the Hugging Face model directory at path."""
    return config_from_hf(read_config_json(path), dtype=dtype)


def _normalise(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def _aligned_empty(shape: list[int], dtype) -> np.ndarray:
    """np.empty, 64-byte aligned: XLA:CPU then adopts the buffer instead of copying it."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _build(
    tensors: dict[str, np.ndarray], src: hf_tensors.Source, shape, dtype, sharding, stacked: bool
) -> jax.Array:
    """One parameter, each device's shard read from the files on its own (replicas read once)."""
    blocks: dict[tuple, np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        index = _normalise(index, shape)
        key = tuple((s.start, s.stop) for s in index)
        if key not in blocks:
            out = _aligned_empty([s.stop - s.start for s in index], dtype)
            if not stacked:
                out[...] = hf_tensors.read_block(tensors, src, None, index)
            for j, layer in enumerate(range(index[0].start, index[0].stop) if stacked else []):
                out[j] = hf_tensors.read_block(tensors, src, layer, index[1:])
            blocks[key] = out
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, shard)


def load_params(path: str, abstract_params: nnx.State, shardings=None) -> nnx.State:
    """Parameters of the Hugging Face model at path, shaped, typed and placed like the given
    abstract ones (`shardings`: a matching tree of NamedShardings; None = the first device).

    The trunk always loads; the head only where the model and the checkpoint have the same
    one. Otherwise the checkpoint's head is not read and the model's is left out of the
    result, to stay as initialised: an LM directory gives a reward model a fresh score head.
    """
    hf_json = read_config_json(path)
    family, cfg = config_from_hf(hf_json)
    head, options = head_of(hf_json)
    tensors = safetensors_io.map_checkpoint(path)
    prefix = "transformer." if family == "gpt2" and "transformer.wte.weight" in tensors else ""
    table = hf_tensors.sources(family, cfg, prefix, head, **options)
    hf_tensors.check_tensors(tensors, table, cfg.n_layers, cfg.tie_embeddings, path)
    for name in hf_tensors.HEAD_PARAMS:
        if name in table and name not in abstract_params:
            del table[name]
    fresh = [n for n in hf_tensors.HEAD_PARAMS if n in abstract_params and n not in table]
    if fresh:
        abstract_params = nnx.filter_state(abstract_params, lambda keys, _: keys[0] not in fresh)
        if shardings is not None:
            shardings = nnx.filter_state(shardings, lambda keys, _: keys[0] not in fresh)
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
        return _build(tensors, src, abstract.shape, abstract.dtype, sharding, stacked)

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
) -> Decoder:
    """A model with the weights of the Hugging Face model directory at path: a `Transformer`
    for a causal LM, a `Scorer` for a sequence classifier.

    dtype is the compute dtype, param_dtype the one parameters are stored in. With a mesh
    (and the logical-axis rules), every tensor is read straight into its sharded placement.
    """
    hf_json = read_config_json(path)
    _, cfg = config_from_hf(hf_json, dtype=dtype)
    head, options = head_of(hf_json)
    if param_dtype not in DTYPES:
        raise ValueError(f"param_dtype={param_dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    make = HEADS[head]
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make(cfg, rngs=nnx.Rngs(0), **options)))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, DTYPES[param_dtype]), abstract)
    shardings = None
    if mesh is not None:
        if rules is None:
            raise ValueError(
                "load_model(mesh=...) needs rules= (mesh.parse_rules(config.mesh.rules))"
            )
        shardings = mesh_lib.tree_shardings(abstract, mesh, rules)
    return nnx.merge(graphdef, load_params(path, abstract, shardings))


def model_head(model: Decoder) -> tuple[str, dict]:
    """(head, its options) of a jtrain model, as `head_of` gives them for a config.json."""
    for head, cls in HEADS.items():
        if isinstance(model, cls):
            return head, {"outputs": model.score_DxO.shape[-1]} if head == "scores" else {}
    raise ValueError(f"a {type(model).__name__} has no Hugging Face head; heads: {list(HEADS)}")


def _special_ids(head: str, vocab_size: int, ids: dict[str, int | None]) -> dict:
    """config.json's {bos,eos,pad}_token_id; a sequence classifier cannot batch without PAD."""
    pad, eos = ids["pad_token_id"], ids["eos_token_id"]
    for name, value in ids.items():
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the model's vocabulary of {vocab_size}")
    if head == "scores" and pad is None:
        raise ValueError(
            "a sequence classifier needs pad_token_id= (jtrain.export takes it from the run's "
            "data.tokenizer): transformers finds each sequence's last token as its last non-PAD"
        )
    if head == "scores" and pad == eos:
        warnings.warn(
            f"PAD == EOS (id {pad}): transformers reads a sequence's score at its last "
            "non-PAD token, one token early for a sequence ending in EOS (jtrain reads it at "
            "the EOS). Give the tokenizer a PAD token of its own and set config.json's "
            "pad_token_id to it (any id below vocab_size that inputs never contain).",
            stacklevel=3,
        )
    return {name: int(value) for name, value in ids.items() if value is not None}


def save_model(
    model: Decoder,
    path: str,
    *,
    family: str | None = None,
    dtype: str = "float32",
    max_position_embeddings: int | None = None,
    max_shard_bytes: int = 4 << 30,
    tokenizer_dir: str | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> None:
    """Writes model as a Hugging Face directory (config.json, safetensors, tokenizer files).

    A `Transformer` is written as the family's causal LM, a `Scorer` as its sequence
    classifier (which needs pad_token_id: see the module's note on PAD). family (llama |
    mistral | qwen2 | gpt2) defaults to the one the model's options match;
    max_position_embeddings defaults to model.max_seq_len; tokenizer files are copied from
    tokenizer_dir when given, the tokenizer's special ids (those given) written to config.json.
    path must not exist or be empty: nothing is overwritten.
    """
    if os.path.exists(path) and os.listdir(path):
        raise FileExistsError(f"{path} is not empty; save_model writes only to a new directory")
    cfg = model.cfg
    family = family or infer_family(cfg)
    head, options = model_head(model)
    max_len = max_position_embeddings or cfg.max_seq_len
    if not max_len:
        raise ValueError("model.max_seq_len is 0: pass max_position_embeddings= to save_model")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    if family == "gpt2" and max_len != cfg.max_seq_len:
        raise ValueError(f"gpt2 stores a position table of model.max_seq_len={cfg.max_seq_len}")
    hf_config = config_to_hf(cfg, family, max_len=max_len, dtype=dtype, head=head, **options)
    ids = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    hf_config.update(_special_ids(head, cfg.vocab_size, ids))
    np_dtype = np.dtype(DTYPES[dtype])
    params = {
        ".".join(map(str, keys)): v.get_value()
        for keys, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    prefix = "transformer." if family == "gpt2" else ""
    table = hf_tensors.sources(family, cfg, prefix, head, **options)
    tensors = hf_tensors.stored_tensors(params, table, cfg.n_layers, np_dtype)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    safetensors_io.write_shards(path, tensors, np_dtype, max_shard_bytes)
    for name in _TOKENIZER_FILES if tokenizer_dir else ():
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(path, name))
