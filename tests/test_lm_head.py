"""The chunked LM head and loss (`model.loss_chunk`): the same per-token values and gradients
as the whole batch's logits at once, without those logits in memory."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtrain.models import lm_head
from jtrain.models.transformer import Transformer, TransformerConfig
from jtrain.tasks import pair_logps
from jtrain.tasks.grpo import token_logps
from jtrain.tasks.lm import nll_and_correct
from tests import conftest

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)

# Float32 sums of the same per-token terms, grouped differently by XLA: rounding only.
RTOL, ATOL = 1e-5, 1e-6


def _model(loss_chunk: int) -> Transformer:
    # The same seed, so both models hold the same parameters: loss_chunk does not touch them.
    return Transformer(TransformerConfig(**SMALL, loss_chunk=loss_chunk), rngs=nnx.Rngs(0))


def test_chunks_give_the_same_values_and_gradients_including_a_short_last_chunk():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (3, 10, 16))
    unembed = jax.random.normal(k2, (16, 50))
    targets = jax.random.randint(k3, (3, 10), 0, 50)
    weight = jnp.arange(30.0).reshape(3, 10) % 3  # zeros, as padding has

    def loss(hidden, unembed, chunk):
        head = lambda h: h @ unembed  # noqa: E731
        if chunk:
            nll, correct = lm_head.chunked(head, hidden, targets, nll_and_correct, chunk)
        else:
            nll, correct = nll_and_correct(head(hidden), targets)
        return jnp.sum(nll * weight), (nll, correct)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (g_hidden, g_unembed), (nll, correct) = grad(hidden, unembed, 0)
    for chunk in (4, 5):  # 10 positions: a short last chunk, then whole chunks
        (c_hidden, c_unembed), (c_nll, c_correct) = grad(hidden, unembed, chunk)
        assert c_nll.shape == (3, 10)
        np.testing.assert_allclose(c_nll, nll, rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(c_correct, correct)
        np.testing.assert_allclose(c_hidden, g_hidden, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(c_unembed, g_unembed, rtol=RTOL, atol=ATOL)


def _packed_batch():
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    segments = jnp.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    positions = jnp.array([list(range(5)) + list(range(7)), list(range(9)) + [0] * 3])
    return tokens, jnp.roll(tokens, -1, axis=1), segments, positions


def test_a_chunked_transformer_matches_the_whole_one_on_packed_rows_with_dropout():
    tokens, targets, segments, positions = _packed_batch()
    weight = (segments > 0).astype(jnp.float32)
    options = dict(positions_BxL=positions, segment_ids_BxL=segments)

    def loss_and_grads(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            m = nnx.merge(graphdef, p)
            nll, correct = lm_head.per_token(
                m, tokens, targets, nll_and_correct, dropout_rng=jax.random.key(2), **options
            )
            return jnp.sum(nll * weight), jnp.sum(correct * weight)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    dropout = {**SMALL, "dropout": 0.1}
    whole = Transformer(TransformerConfig(**dropout), rngs=nnx.Rngs(0))
    chunked = Transformer(TransformerConfig(**dropout, loss_chunk=5), rngs=nnx.Rngs(0))
    (w_loss, w_correct), w_grads = loss_and_grads(whole)
    (c_loss, c_correct), c_grads = loss_and_grads(chunked)
    np.testing.assert_allclose(c_loss, w_loss, rtol=RTOL)
    assert c_correct == w_correct
    for a, b in zip(jax.tree.leaves(w_grads), jax.tree.leaves(c_grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


def test_grpo_and_pair_log_probs_are_chunked_too():
    tokens, targets, _, _ = _packed_batch()
    whole, chunked = _model(0), _model(4)
    batch = {"inputs": tokens, "targets": targets}
    for a, b in zip(token_logps(whole, batch, 0.7), token_logps(chunked, batch, 0.7), strict=True):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    completion = jnp.ones_like(tokens).at[:, :3].set(0)
    for a, b in zip(
        pair_logps.sequence_logps(whole, tokens, completion),
        pair_logps.sequence_logps(chunked, tokens, completion),
        strict=True,
    ):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


def test_the_compiled_gradient_never_holds_the_whole_batchs_logits():
    # 8 x 128 positions over 16384 ids: 64 MiB of float32 logits, and as much for their
    # gradient; the trunk (d_model 32) holds about 15 MiB. A 16-position chunk's logits and
    # their gradient take 16 MiB.
    cfg = dict(SMALL, vocab_size=16384)
    tokens = jnp.zeros((8, 128), jnp.int32)

    def temp_bytes(loss_chunk: int) -> int:
        model = Transformer(TransformerConfig(**cfg, loss_chunk=loss_chunk), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            [nll, _] = lm_head.per_token(nnx.merge(graphdef, p), tokens, tokens, nll_and_correct)
            return jnp.sum(nll)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(16)
    logits_bytes = 8 * 128 * 16384 * 4
    assert whole >= 2 * logits_bytes, (whole, logits_bytes)  # 143 MiB measured
    assert chunked < logits_bytes / 2, (chunked, whole)  # 31 MiB measured


def test_a_training_run_with_loss_chunks_logs_the_losses_of_one_without(tmp_path):
    from jtrain.run import train_and_evaluate

    losses = {}
    for chunk in (0, 16):  # tiny.py: 64 positions, sharded over the 8 fake devices' mesh
        config = conftest.tiny_config(
            train__steps=3, eval__every_steps=0, checkpoint__every_steps=0, model__loss_chunk=chunk
        )
        train_and_evaluate(config, str(tmp_path / f"chunk{chunk}"))
        losses[chunk] = conftest.train_losses(str(tmp_path / f"chunk{chunk}"))
    assert losses[0].keys() == losses[16].keys() and len(losses[0]) >= 1
    for step, loss in losses[0].items():
        np.testing.assert_allclose(losses[16][step], loss, rtol=RTOL)
