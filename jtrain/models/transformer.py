"""A decoder-only transformer in the Llama recipe, with its blocks stacked and scanned.

Stacking the blocks along a leading "layers" axis keeps compile time independent of depth
and lets one rematerialisation policy cover every block. Options beyond the Llama recipe
(biases, LayerNorm, learned positions, a GELU MLP) cover the Qwen2, Mistral and GPT-2 layouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jtrain import models
from jtrain.models import attention_impl, layers
from jtrain.validation import one_of, positive_ints, require

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLEMENTATIONS = attention_impl.IMPLEMENTATIONS  # xla | cudnn | auto
CHOICES = {
    "norm": ("rms", "layer"),
    "positions": ("rope", "learned"),
    "mlp_activation": tuple(layers.ACTIVATIONS),
    "rope_scaling": ("none", "linear", "llama3"),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of the model; field names match the `model.*` config keys."""

    vocab_size: int = 384
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 32
    d_ff: int = 768
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"
    loss_chunk: int = 0  # sequence positions per chunk of the LM head + loss (0 = all at once)
    norm: str = "rms"  # rms | layer (LayerNorm with bias, GPT-2)
    positions: str = "rope"  # rope | learned (a max_seq_len x d_model table, GPT-2)
    max_seq_len: int = 0  # longest sequence the model is meant for; the learned table's size
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2, GPT-2)
    out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_gated: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x))) (GPT-2)
    mlp_activation: str = "silu"  # silu | gelu | gelu_tanh
    mlp_bias: bool = False  # biases on the MLP projections (GPT-2)
    sliding_window: int = 0  # attend to at most this many tokens, self included (0 = all)
    rope_scaling: str = "none"  # none | linear | llama3 (Llama 3.1 long-context frequencies)
    rope_factor: float = 1.0  # linear, llama3: how much longer the context is made
    rope_low_freq_factor: float = 1.0  # llama3 parameters, as in Hugging Face's rope_scaling
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                allowed_text = ", ".join(allowed)
                raise ValueError(f"model.{name}={value!r} is invalid; allowed: {allowed_text}")
        if self.positions == "learned" and self.max_seq_len <= 0:
            raise ValueError("model.positions='learned' needs model.max_seq_len > 0")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TransformerConfig:
        """Builds the config from `config.model`, ignoring keys other models use."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def flops_per_token(
        self, seq_len: int, *, weight_grads: bool = True, head_outputs: int | None = None
    ) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B.

        Each weight costs 2 FLOPs forward, 2 for the input gradient and 2 for its own gradient;
        a frozen base (LoRA) skips the last, so weight_grads=False counts 4 (adapters, a few
        per cent at most, are left out). `head_outputs`: a scores head's width (a reward
        model's 1) instead of the vocabulary's."""
        d, h, g, k, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        mlp_matrices = 3 if self.mlp_gated else 2
        matmul_params = self.n_layers * (2 * d * h * k + 2 * d * g * k + mlp_matrices * d * f)
        matmul_params += d * (self.vocab_size if head_outputs is None else head_outputs)
        attention = 12 * self.n_layers * h * k * seq_len
        return (6.0 if weight_grads else 4.0) * matmul_params + attention


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). Causal for the
    decoder; `causal=False` lets every position see every other (the ViT's patches)."""

    def __init__(self, cfg: TransformerConfig, *, causal: bool = True, rngs: nnx.Rngs):
        self.attn_norm = layers.norm(cfg, rngs=rngs)
        self.attn = layers.Attention(cfg, causal=causal, rngs=rngs)
        self.mlp_norm = layers.norm(cfg, rngs=rngs)
        self.mlp = layers.MLP(cfg, rngs=rngs)
        self.dropout_rate = cfg.dropout

    def __call__(self, x_BxLxD, positions_BxL, mask, dropout_rng, cache=None):
        """The block's output and, when decoding, its attention's updated KV cache."""
        rng_attn, rng_mlp = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        h, cache = self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask, rng_attn, cache)
        x_BxLxD = x_BxLxD + layers.dropout(h, self.dropout_rate, rng_attn)
        h = self.mlp(self.mlp_norm(x_BxLxD), rng_mlp)
        return x_BxLxD + layers.dropout(h, self.dropout_rate, rng_mlp), cache


class Decoder(nnx.Module):
    """The trunk: token ids -> final-normed hidden states [B, L, D]; heads sit on top."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_VxD = layers.param(
            rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), stddev=cfg.d_model**-0.5
        )

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = layers.norm(cfg, rngs=rngs)
        if cfg.positions == "learned":
            # No logical name for the position axis: the table is small and replicated.
            self.pos_embed_LxD = layers.param(
                rngs, (cfg.max_seq_len, cfg.d_model), (None, "embed"), stddev=0.02
            )

    def hidden(
        self,
        tokens_BxL: jax.Array,
        *,
        positions_BxL: jax.Array | None = None,
        segment_ids_BxL: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, L, D] in the compute dtype."""
        cfg = self.cfg
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        mask = layers.attention_mask(segment_ids_BxL)
        block_def, block_state = nnx.split(self.blocks)
        layer_rngs = None
        if dropout_rng is not None:
            layer_rngs = jax.random.split(dropout_rng, cfg.n_layers)

        def run_block(x, layer):
            state, rng = layer
            return nnx.merge(block_def, state)(x, positions_BxL, mask, rng)[0], None

        if cfg.remat != "none":
            run_block = jax.checkpoint(run_block, policy=REMAT_POLICIES[cfg.remat])
        x_BxLxD = self._embed(tokens_BxL, positions_BxL)
        x_BxLxD, _ = jax.lax.scan(run_block, x_BxLxD, (block_state, layer_rngs))
        return self.final_norm(x_BxLxD)

    def layer_blocks(self) -> list[nnx.Module]:
        """Each layer's block on its own, its weights sliced out of the stacked ones: what
        `decode` runs. A decode loop slices them once, before it starts; sliced inside the
        loop, XLA:CPU copied every weight at every step."""
        block_def, block_state = nnx.split(self.blocks)
        return [
            nnx.merge(block_def, jax.tree.map(lambda a, i=layer: a[i], block_state))
            for layer in range(self.cfg.n_layers)
        ]

    def decode(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array,
        caches: Sequence[layers.KVCache],
        blocks: Sequence[nnx.Module] | None = None,
    ) -> tuple[jax.Array, list[layers.KVCache]]:
        """Hidden states of T new tokens attending over every layer's cache, and the updated
        caches; `blocks` are `layer_blocks()`, sliced anew when not given.

        The layers run one after another in Python, not in a scan: each layer's cache stays a
        buffer of its own that XLA updates in place, where slicing a stacked [n_layers, ...]
        cache in a scan copied a layer's cache at every step (most of a decode step's time on
        XLA:CPU).
        """
        x_BxTxD = self._embed(tokens_BxT, positions_BxT)
        updated = []
        for block, cache in zip(blocks or self.layer_blocks(), caches, strict=True):
            x_BxTxD, cache = block(x_BxTxD, positions_BxT, None, None, cache)
            updated.append(cache)
        return self.final_norm(x_BxTxD), updated

    def _embed(self, tokens_BxL: jax.Array, positions_BxL: jax.Array) -> jax.Array:
        dtype = DTYPES[self.cfg.dtype]
        x_BxLxD = self.embed_VxD[...].astype(dtype)[tokens_BxL]
        if self.cfg.positions == "learned":
            x_BxLxD = x_BxLxD + self.pos_embed_LxD[...].astype(dtype)[positions_BxL]
        return x_BxLxD


class Transformer(Decoder):
    """The trunk with the language-model head: token ids -> next-token logits."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        if not cfg.tie_embeddings:
            self.unembed_DxV = layers.param(
                rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), stddev=cfg.d_model**-0.5
            )

    def __call__(self, tokens_BxL: jax.Array, **trunk_options) -> jax.Array:
        """Returns float32 logits [B, L, V]; dropout only when a dropout_rng is given."""
        return self.logits(self.hidden(tokens_BxL, **trunk_options))

    @property
    def loss_chunk(self) -> int:
        """Positions per chunk of the head and loss (`jtrain.models.lm_head`); 0: all at once."""
        return self.cfg.loss_chunk

    def logits(self, x_BxLxD: jax.Array) -> jax.Array:
        """The head: float32 next-token logits [B, L, V] of hidden states."""
        if self.cfg.tie_embeddings:
            unembed_DxV = self.embed_VxD[...].T
        else:
            unembed_DxV = self.unembed_DxV[...]
        return layers.dense(x_BxLxD, unembed_DxV).astype(jnp.float32)


class Scorer(Decoder):
    """The trunk with a small linear head: token ids -> `outputs` scores per position.

    One output is a reward model's scalar; several, a sequence classifier's logits. The trunk's
    parameters have the same names as a language model's, so an LM run initialises it.
    """

    def __init__(self, cfg: TransformerConfig, *, outputs: int = 1, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.score_DxO = layers.param(
            rngs, (cfg.d_model, outputs), ("embed", None), stddev=cfg.d_model**-0.5
        )

    def __call__(self, tokens_BxL: jax.Array, **trunk_options) -> jax.Array:
        """Returns float32 scores [B, L, outputs]."""
        x_BxLxD = self.hidden(tokens_BxL, **trunk_options)
        return layers.dense(x_BxLxD, self.score_DxO[...]).astype(jnp.float32)


HEADS = {"logits": Transformer, "scores": Scorer}
# The parameters of the heads, not of the trunk: weights loaded from a model with another
# head (an LM into a reward model) skip them, and the model's own head starts fresh.
HEAD_PARAMS = ("unembed_DxV", "score_DxO")


@models.register("transformer")
class TransformerFamily:
    """Decoder-only transformers: Llama, Mistral, Qwen2 and GPT-2 layouts."""

    reads = "tokens"

    def make(self, model_config, *, head: str, rngs: nnx.Rngs, **head_options) -> Decoder:
        """The trunk of `model_config` with the named head (`logits` or `scores`)."""
        cfg = TransformerConfig.from_mapping(model_config)
        return HEADS[head](cfg, rngs=rngs, **head_options)

    def validate(self, config) -> None:
        """Checks the transformer's `model.*` keys; ConfigError names the first bad one."""
        m = config.model
        sizes = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")
        positive_ints(m, "model", sizes)
        require(
            m.n_heads % m.n_kv_heads == 0,
            "model.n_kv_heads",
            m.n_kv_heads,
            f"must divide model.n_heads={m.n_heads} (grouped-query attention)",
        )
        require(
            m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even (rotary embedding)"
        )
        require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
        require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be positive")
        require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be positive")
        one_of("model.dtype", m.dtype, DTYPES)
        one_of("model.remat", m.remat, REMAT_POLICIES)
        one_of("model.attention", m.attention, ATTENTION_IMPLEMENTATIONS)
        attention_impl.validate(config)  # an explicit cudnn: can it run here?
        for name, allowed in CHOICES.items():
            one_of(f"model.{name}", m[name], allowed)
        require(m.max_seq_len >= 0, "model.max_seq_len", m.max_seq_len, "must be >= 0")
        if m.positions == "learned":
            seq_len = config.train.seq_len
            require(
                m.max_seq_len >= seq_len,
                "model.max_seq_len",
                m.max_seq_len,
                f"must be at least train.seq_len={seq_len} with learned positions (a row each)",
            )
        require(
            isinstance(m.loss_chunk, int) and m.loss_chunk >= 0,
            "model.loss_chunk",
            m.loss_chunk,
            "must be an integer >= 0 (sequence positions per chunk; 0 = the whole sequence)",
        )
        require(m.sliding_window >= 0, "model.sliding_window", m.sliding_window, "must be >= 0")
        require(m.rope_factor > 0, "model.rope_factor", m.rope_factor, "must be positive")
