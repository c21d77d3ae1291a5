"""Hugging Face config.json <-> jtrain's TransformerConfig, for the supported families.

`config_from_hf` maps a config.json of a Llama, Mistral, Qwen2 or GPT-2 model onto a
`TransformerConfig`, raising a ValueError for any key or value that would change the model
and that jtrain cannot express (nothing is silently ignored); `config_to_hf` is the inverse,
checked by reading its result back. `infer_family` picks the family a config's options match.
The trunk's keys are the same whatever sits on it; `head_of` says which head a config.json
describes: a causal LM's (`logits`) or a sequence classifier's (`scores`, a reward model's
with one label), the two heads of `jtrain.models.transformer`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

from jtrain.errors import DataError
from jtrain.models.transformer import DTYPES, TransformerConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# The architecture of each family by jtrain head: the LM head, or a score per label read at
# each sequence's last non-PAD token (transformers' sequence classifiers, reward models).
HEAD_ARCHITECTURES = {
    "logits": ARCHITECTURES,
    "scores": {
        "llama": "LlamaForSequenceClassification",
        "mistral": "MistralForSequenceClassification",
        "qwen2": "Qwen2ForSequenceClassification",
        "gpt2": "GPT2ForSequenceClassification",
    },
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
    # A sequence classifier's labels (head_of reads their number) and its training loss.
    "id2label", "label2id", "num_labels", "problem_type",
}  # fmt: skip
_GELUS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


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


def read_config_json(path: str) -> dict:
    """The config.json of the Hugging Face model directory at path, as a dict; a DataError
    names the file when it is not a JSON object."""
    file = os.path.join(path, "config.json")
    with open(file, encoding="utf-8") as f:
        text = f.read()
    try:
        hf = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "fix it, or download the model again."
        ) from None
    if not isinstance(hf, dict):
        raise DataError(f"{file} holds a JSON {type(hf).__name__}, not an object of model keys.")
    return hf


def config_from_hf(hf: Mapping, *, dtype: str = "float32") -> tuple[str, TransformerConfig]:
    """(family, TransformerConfig) of a Hugging Face config.json dict; unsupported -> ValueError."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(
            f"model_type {family!r} is not supported; supported: {list(ARCHITECTURES)}"
        )
    head_of(hf)  # the architecture names a head jtrain has
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    keys = _Keys(hf)
    fields = _gpt2_config(keys) if family == "gpt2" else _llama_config(keys, family)
    keys.check_all_used()
    return family, TransformerConfig(**fields, dtype=dtype)


def head_of(hf: Mapping) -> tuple[str, dict]:
    """(head, its options) of a config.json dict: ("logits", {}) for a causal LM, ("scores",
    {"outputs": number of labels}) for a sequence classifier; ValueError for other heads."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(
            f"model_type {family!r} is not supported; supported: {list(ARCHITECTURES)}"
        )
    archs = list(hf.get("architectures") or [ARCHITECTURES[family]])
    heads = [head for head, names in HEAD_ARCHITECTURES.items() if archs == [names[family]]]
    if not heads:
        allowed = [names[family] for names in HEAD_ARCHITECTURES.values()]
        raise ValueError(f"architectures {archs} not supported; only one of {allowed}")
    head = heads[0]
    if head == "logits":
        return head, {}
    # transformers' default, as PretrainedConfig applies it, when the file names no labels.
    labels = len(hf.get("id2label") or {}) or hf.get("num_labels") or 2
    return head, {"outputs": int(labels)}


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


def config_to_hf(
    cfg: TransformerConfig,
    family: str,
    *,
    max_len: int,
    dtype: str,
    head: str = "logits",
    outputs: int = 1,
) -> dict:
    """The config.json of cfg as a `family` model with `head` (logits | scores, of `outputs`
    labels); ValueError if the family cannot express it."""
    if family not in ARCHITECTURES:
        raise ValueError(f"family {family!r} is not supported; supported: {list(ARCHITECTURES)}")
    if head not in HEAD_ARCHITECTURES:
        raise ValueError(f"head {head!r} is not supported; supported: {list(HEAD_ARCHITECTURES)}")
    arch = HEAD_ARCHITECTURES[head][family]
    hf = {"architectures": [arch], "model_type": family, "torch_dtype": dtype}
    if head == "scores":
        # As transformers writes them; their number is the head's width.
        hf.update(id2label={str(i): f"LABEL_{i}" for i in range(outputs)})
        hf.update(label2id={f"LABEL_{i}": i for i in range(outputs)})
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
    unchanged = ("dtype", "dropout", "remat", "attention", "loss_chunk", "max_seq_len")
    for field in dataclasses.fields(cfg):
        mine, theirs = getattr(cfg, field.name), getattr(back, field.name)
        if field.name not in unchanged and mine != theirs:
            raise ValueError(f"a {family} model cannot have model.{field.name}={mine!r}")
    return hf


def infer_family(cfg: TransformerConfig) -> str:
    """The family whose options cfg matches: gpt2, qwen2, mistral or llama."""
    if cfg.positions == "learned":
        return "gpt2"
    if cfg.qkv_bias and not cfg.out_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"
