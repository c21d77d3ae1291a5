"""Exact unit tests of the transformer's parts: RoPE, causal masking, GQA, dropout, remat."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtrain.models import layers
from jtrain.models.transformer import Transformer, TransformerConfig

SMALL = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)


def test_rope_rotates_each_pair_by_position_times_frequency():
    # head_dim 4: two frequencies, theta**0 = 1 and theta**(-1/2) = 0.01 for theta = 1e4.
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    pos = 3
    out = layers.apply_rope(x, jnp.array([[pos]]), theta=1e4)[0, 0, 0]
    a0, a1 = pos * 1.0, pos * 0.01
    # Halves layout: dims (0, 2) rotate together at frequency 0, dims (1, 3) at frequency 1.
    expected = [
        1.0 * math.cos(a0) - 3.0 * math.sin(a0),
        2.0 * math.cos(a1) - 4.0 * math.sin(a1),
        3.0 * math.cos(a0) + 1.0 * math.sin(a0),
        4.0 * math.cos(a1) + 2.0 * math.sin(a1),
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_array_equal(layers.apply_rope(x, jnp.array([[0]]), 1e4), x)


def test_rope_scores_depend_only_on_relative_position():
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))

    def score(m, n):
        qm = layers.apply_rope(q, jnp.array([[m]]), 1e4)
        kn = layers.apply_rope(k, jnp.array([[n]]), 1e4)
        return float(jnp.sum(qm * kn))

    np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
    np.testing.assert_allclose(score(0, 0), score(7, 7), rtol=1e-5)


def test_causal_mask_future_tokens_do_not_change_earlier_logits():
    model = Transformer(SMALL, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, SMALL.vocab_size)
    changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % SMALL.vocab_size)
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_segment_ids_keep_documents_apart():
    model = Transformer(SMALL, rngs=nnx.Rngs(0))
    doc_b = jnp.array([[5, 6, 7, 8]])
    packed = jnp.concatenate([jnp.array([[1, 2, 3]]), doc_b], axis=1)
    segments = jnp.array([[0, 0, 0, 1, 1, 1, 1]])
    positions = jnp.array([[0, 1, 2, 0, 1, 2, 3]])
    out = model(packed, positions_BxL=positions, segment_ids_BxL=segments)
    alone = model(doc_b)
    np.testing.assert_allclose(out[:, 3:], alone, rtol=1e-5, atol=1e-5)


def _reference_attention(attn: layers.Attention, x, groups: int):
    """Plain multi-head attention with each key/value head repeated for its query group."""
    length = x.shape[1]
    positions = jnp.arange(length)[None]
    q = layers.apply_rope(jnp.einsum("bld,dhk->blhk", x, attn.q_DxHxK[...]), positions, 1e4)
    k = layers.apply_rope(jnp.einsum("bld,dgk->blgk", x, attn.k_DxGxK[...]), positions, 1e4)
    v = jnp.einsum("bld,dgk->blgk", x, attn.v_DxGxK[...])
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((length, length), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    return jnp.einsum("blhk,hkd->bld", out, attn.o_HxKxD[...])


def test_grouped_query_attention_shares_each_kv_head_across_its_query_group():
    attn = layers.Attention(SMALL, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 9, SMALL.d_model))
    out, _ = attn(x, jnp.broadcast_to(jnp.arange(9), (2, 9)), None)
    groups = SMALL.n_heads // SMALL.n_kv_heads
    np.testing.assert_allclose(out, _reference_attention(attn, x, groups), rtol=1e-5, atol=1e-6)


def test_parameters_carry_logical_axes_and_tied_embeddings_have_no_unembed():
    tied = nnx.state(Transformer(SMALL, rngs=nnx.Rngs(0)), nnx.Param)
    specs = nnx.get_partition_spec(tied)
    assert tuple(specs["blocks"]["mlp"]["gate_DxF"].get_value()) == ("layers", "embed", "mlp")
    assert tuple(specs["embed_VxD"].get_value()) == ("vocab", "embed")
    assert "unembed_DxV" not in tied
    untied = Transformer(
        TransformerConfig(**{**SMALL.__dict__, "tie_embeddings": False}), rngs=nnx.Rngs(0)
    )
    assert nnx.state(untied, nnx.Param)["unembed_DxV"].get_value().shape == (32, 64)


def test_dropout_only_with_an_rng():
    cfg = TransformerConfig(**{**SMALL.__dict__, "dropout": 0.5})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.ones((1, 8), jnp.int32)
    np.testing.assert_array_equal(model(tokens), model(tokens))
    assert not np.allclose(model(tokens), model(tokens, dropout_rng=jax.random.key(0)))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat):
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, SMALL.vocab_size)

    def grads(cfg):
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(tokens) ** 2))(params)

    plain = grads(SMALL)
    rematted = grads(TransformerConfig(**{**SMALL.__dict__, "remat": remat}))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits_close():
    cfg = TransformerConfig(**{**SMALL.__dict__, "dtype": "bfloat16"})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    reference = Transformer(SMALL, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, SMALL.vocab_size)
    out = model(tokens)
    assert out.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(out, reference(tokens), atol=0.1)


def test_flops_per_token_matches_the_palm_formula():
    cfg = SMALL
    per_layer = 2 * 32 * 4 * 8 + 2 * 32 * 2 * 8 + 3 * 32 * 64
    n = 2 * per_layer + 32 * 64
    assert cfg.flops_per_token(16) == 6 * n + 12 * 2 * 4 * 8 * 16
    assert cfg.flops_per_token(16, weight_grads=False) == 4 * n + 12 * 2 * 4 * 8 * 16
