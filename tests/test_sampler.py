"""The KV-cache sampler: greedy batches of prompts of different lengths are token for token
`transformers` `generate` for every family; log-probabilities equal the training forward
pass's; sampling settings behave; shapes compile once per bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtrain import models
from jtrain.sampler import Sampler, fewest_in, length_bucket, length_buckets, rows_bucket
from tests.conftest import greedy_by_full_forward, tiny_config

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 8], [11] * 12, [120, 1, 2, 3]]
NEW = 10


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_config()
    return models.family_of(config.model).make(config.model, head="logits", rngs=nnx.Rngs(0))


def _forward_log_probs(model, prompt, completion, temperature=1.0):
    tokens = jnp.asarray([list(prompt) + list(completion)])
    logits = model(tokens)[0, len(prompt) - 1 : -1] / temperature
    return np.asarray(
        jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[0, len(prompt) :, None], -1)[:, 0]
    )


def test_greedy_batches_equal_one_prompt_at_a_time_by_full_forward(tiny_model):
    out = Sampler(tiny_model).generate(PROMPTS, max_new_tokens=NEW)
    for prompt, completion in zip(PROMPTS, out, strict=True):
        assert completion.tokens.tolist() == greedy_by_full_forward(tiny_model, prompt, NEW)
        assert completion.finish_reason == "length"


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_log_probs_equal_the_training_forward_pass(tiny_model, temperature):
    out = Sampler(tiny_model).generate(PROMPTS, max_new_tokens=NEW, temperature=temperature, seed=3)
    for prompt, completion in zip(PROMPTS, out, strict=True):
        expected = _forward_log_probs(tiny_model, prompt, completion.tokens, temperature or 1.0)
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-5)


def test_sampling_settings(tiny_model):
    sampler = Sampler(tiny_model)
    greedy = sampler.generate(PROMPTS, max_new_tokens=NEW)
    hot = dict(max_new_tokens=NEW, temperature=1.5, seed=7)
    assert [c.tokens.tolist() for c in sampler.generate(PROMPTS, top_k=1, **hot)] == [
        c.tokens.tolist() for c in greedy
    ]  # top-1 is greedy, whatever the temperature
    assert [c.tokens.tolist() for c in sampler.generate(PROMPTS, top_p=1e-6, **hot)] == [
        c.tokens.tolist() for c in greedy
    ]  # so is a nucleus of one token
    a, b = sampler.generate(PROMPTS, **hot), sampler.generate(PROMPTS, **hot)
    assert [c.tokens.tolist() for c in a] == [c.tokens.tolist() for c in b]  # seeded
    c = sampler.generate(PROMPTS, **{**hot, "seed": 8})
    assert [x.tokens.tolist() for x in a] != [x.tokens.tolist() for x in c]
    # Per-row settings: a greedy row in a sampled batch is still greedy.
    mixed = sampler.generate(PROMPTS, max_new_tokens=NEW, temperature=[0.0, 1.5, 1.5, 0.0])
    assert mixed[0].tokens.tolist() == greedy[0].tokens.tolist()
    assert mixed[3].tokens.tolist() == greedy[3].tokens.tolist()


def test_rows_stop_independently(tiny_model):
    sampler = Sampler(tiny_model)
    greedy = sampler.generate(PROMPTS, max_new_tokens=NEW)
    row0 = greedy[0].tokens.tolist()
    first = next((j for j in range(1, NEW) if row0[j] not in row0[:j]), 0)
    stop = row0[first]  # row 0 meets it first at position `first`
    out = sampler.generate(PROMPTS, max_new_tokens=NEW, stop_ids=[stop])
    assert out[0].tokens.tolist() == row0[: first + 1]
    assert out[0].finish_reason == "stop"
    for row, full in zip(out[1:], greedy[1:], strict=True):
        hits = np.flatnonzero(full.tokens == stop)
        end = int(hits[0]) + 1 if hits.size else NEW
        assert row.tokens.tolist() == full.tokens[:end].tolist()


def test_advancing_in_steps_streams_the_same_tokens(tiny_model):
    # What a token stream sends: the first tokens after the prefill, then each row's new
    # tokens per call, nothing after a row's stop; joined, they are the one-call completion.
    sampler = Sampler(tiny_model)
    greedy = sampler.generate(PROMPTS, max_new_tokens=NEW)
    stop = greedy[1].tokens.tolist()[3]
    settings = dict(max_new_tokens=NEW, stop_ids=[stop], temperature=[0.0, 0.0, 0.9, 0.9], seed=5)
    whole = sampler.generate(PROMPTS, **settings)
    decoding = sampler.start(PROMPTS, **settings)
    first = decoding.advance(0)
    assert [t.tolist() for t in first] == [c.tokens[:1].tolist() for c in whole]
    pieces, calls = [first], 0
    while not decoding.finished:
        pieces.append(decoding.advance(3))
        calls += 1
    assert calls == -(-(NEW - 1) // 3)  # 3 tokens a call after the first
    for row, completion in enumerate(decoding.completions()):
        streamed = np.concatenate([piece[row] for piece in pieces]).tolist()
        assert streamed == completion.tokens.tolist() == whole[row].tokens.tolist()
        np.testing.assert_array_equal(completion.logprobs, whole[row].logprobs)
    assert whole[1].finish_reason == "stop" and len(whole[1].tokens) <= 4
    assert sampler.compilations() == 1  # chunks of any size reuse the bucket's decode loop
    assert sampler._decode._cache_size() == 1
    with pytest.raises(RuntimeError, match="still decoding"):
        sampler.start(PROMPTS, max_new_tokens=NEW).completions()


def test_one_compilation_per_bucket(tiny_model):
    sampler = Sampler(tiny_model)
    rng = np.random.default_rng(0)
    for _ in range(6):  # 1-3 prompts of 1-16 tokens, 1-16 new tokens: one bucket
        prompts = [rng.integers(1, 200, rng.integers(1, 17)).tolist() for _ in range(3)]
        sampler.generate(prompts, max_new_tokens=int(rng.integers(1, 17)))
    assert sampler.compilations() == 1
    sampler.generate([[1] * 17], max_new_tokens=4)  # a longer prompt: a second bucket
    assert sampler.compilations() == 2
    assert sampler.buckets == {(4, 16, 16), (1, 24, 16)}


def test_greedy_picks_the_first_maximum_as_argmax_does():
    from jtrain.sampler import _argmax

    logits = jnp.asarray(
        [[0.0, 3.0, 3.0, 1.0], [-1.0, -2.0, -1.0, -5.0], [0.0, jnp.nan, 9.0, jnp.nan]]
    )
    assert _argmax(logits).tolist() == jnp.argmax(logits, -1).tolist() == [1, 0, 1]


def test_buckets():
    # Lengths: powers of two and 1.5 times them from 16; rows: powers of two (mesh axes).
    lengths = [1, 16, 17, 24, 25, 33, 48, 49, 65, 97, 129, 200]
    assert [length_bucket(n) for n in lengths] == [
        16,
        16,
        24,
        24,
        32,
        48,
        48,
        64,
        96,
        128,
        192,
        256,
    ]
    assert length_buckets(100) == [16, 24, 32, 48, 64, 96, 128]
    assert [fewest_in(size) for size in (16, 24, 32, 48, 64)] == [1, 17, 25, 33, 49]
    assert all(length_bucket(fewest_in(size)) == size for size in length_buckets(5000))
    assert [rows_bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


def test_the_sampler_runs_on_a_sharded_training_state():
    # The training state as the step leaves it (2 x 2 x 2 mesh: data, fsdp, tensor), used
    # in place: the same tokens and log-probs as the same weights on one device.
    from jtrain.experiment import Experiment

    config = tiny_config(mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
    exp = Experiment.from_config(config)
    params = exp.init_state().model_params
    assert len(jax.tree.leaves(params)[0].sharding.device_set) == 8
    sharded = Sampler(nnx.merge(exp.graphdef, params)).generate(PROMPTS, max_new_tokens=NEW)
    local = nnx.merge(exp.graphdef, jax.device_get(params))
    for a, b in zip(sharded, Sampler(local).generate(PROMPTS, max_new_tokens=NEW), strict=True):
        assert a.tokens.tolist() == b.tokens.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_bad_requests_say_what_is_wrong(tiny_model):
    sampler = Sampler(tiny_model)
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        sampler.generate([[1]], max_new_tokens=0)


torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_families(tmp_path_factory):
    """Each family of tests/test_hf.py as a transformers model and its jtrain import."""
    from jtrain.interop import hf
    from tests.test_hf import FAMILIES, noisy_model

    torch.set_num_threads(1)
    out = {}
    for name, config in FAMILIES.items():
        model = noisy_model(config)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (model, hf.load_model(path))
    return out


@pytest.mark.parametrize("name", ["llama3", "llama_tied_bias", "mistral", "qwen2", "gpt2"])
def test_greedy_equals_transformers_generate(hf_families, name):
    torch_model, model = hf_families[name]
    width = max(len(p) for p in PROMPTS)
    ids = torch.zeros((len(PROMPTS), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(PROMPTS):  # left padding, as for any batched decoder
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    with torch.no_grad():
        expected = torch_model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=NEW,
            min_new_tokens=NEW,  # no early end on a random model's EOS
            pad_token_id=0,
        )[:, width:].numpy()
    out = Sampler(model).generate(PROMPTS, max_new_tokens=NEW)
    assert np.stack([c.tokens for c in out]).tolist() == expected.tolist()
