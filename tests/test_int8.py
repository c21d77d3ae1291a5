"""Weight-only int8 for serving: a quarter of the weight bytes, logits close to the float
model's, and the sampler and generate CLI run on it unchanged."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtrain import models
from jtrain.models import int8
from jtrain.sampler import Sampler
from tests.conftest import greedy_by_full_forward, tiny_config


def _model(**overrides):
    config = tiny_config(**overrides)
    return models.family_of(config.model).make(config.model, head="logits", rngs=nnx.Rngs(0))


def test_int8_holds_a_quarter_of_the_bytes_and_close_logits():
    model = _model()
    quantized = int8.quantize(nnx.clone(model))
    # Norms stay float32; everything else is 1 byte + a scale per channel.
    assert int8.weight_bytes(model) / int8.weight_bytes(quantized) > 3.5
    tokens = jnp.arange(64, dtype=jnp.int32).reshape(2, 32) % 300
    logits, logits8 = model(tokens), quantized(tokens)
    # Per-channel int8 rounds each weight by at most 1/254 of its channel's largest.
    error = float(jnp.max(jnp.abs(logits8 - logits))) / float(jnp.max(jnp.abs(logits)))
    assert 0 < error < 0.02


def test_untied_tables_and_the_sampler_on_int8():
    model = _model(model__tie_embeddings=False)
    quantized = int8.quantize(nnx.clone(model))
    assert isinstance(quantized.unembed_DxV, int8.Int8Kernel)
    assert isinstance(quantized.embed_VxD, int8.Int8Kernel)
    prompts = [[1, 2, 3], [9] * 10]
    out = Sampler(quantized).generate(prompts, max_new_tokens=5)
    for prompt, completion in zip(prompts, out, strict=True):
        expected = greedy_by_full_forward(quantized, prompt, 5)
        np.testing.assert_array_equal(completion.tokens, expected)
