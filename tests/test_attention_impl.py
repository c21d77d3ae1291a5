"""model.attention = xla | cudnn | auto: which kernel runs where, said once, and the XLA path
unchanged. The GPU branches are checked on CPU through the pure functions and a stand-in
device; the kernels themselves only through XLA (cuDNN needs a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtrain import config as config_lib
from jtrain.models import attention_impl, layers
from jtrain.models.attention_impl import Device
from jtrain.models.transformer import Transformer, TransformerConfig
from jtrain.validation import ConfigError

H100 = Device("gpu", "9.0", 90800)
A100 = Device("gpu", "8.0", 90800)
SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


@pytest.fixture(autouse=True)
def fresh_resolve():
    """resolve() caches per model shape: each test starts (and leaves) it empty."""
    attention_impl.resolve.cache_clear()
    yield
    attention_impl.resolve.cache_clear()


@pytest.mark.parametrize(
    "device, dtype, head_dim, window, why",
    [
        (H100, "bfloat16", 128, False, None),
        (H100, "bfloat16", 256, True, None),
        (A100, "bfloat16", 128, False, None),
        (Device("cpu"), "bfloat16", 64, False, "backend is cpu"),
        (Device("tpu"), "bfloat16", 64, False, "backend is tpu"),
        (Device("rocm"), "bfloat16", 64, False, "backend is rocm"),
        (Device("gpu", "9.0", 0), "bfloat16", 64, False, "no cuDNN"),
        (H100, "float32", 64, False, "model.dtype is float32"),
        (Device("gpu", "7.5", 90800), "bfloat16", 64, False, "8.0 (Ampere)"),
        (Device("gpu", "10.3", 91000), "bfloat16", 64, False, "cuDNN 9.11 or newer; jax has 9.10"),
        (H100, "bfloat16", 12, False, "multiple of 8"),
        (H100, "bfloat16", 264, False, "at most 256"),
        (A100, "bfloat16", 192, False, "at most 128"),
        (
            Device("gpu", "9.0", 90100),
            "bfloat16",
            64,
            True,
            "window needs cuDNN 9.2 or newer; jax has 9.1",
        ),
    ],
)
def test_cudnn_unsupported_names_each_requirement(device, dtype, head_dim, window, why):
    got = attention_impl.cudnn_unsupported(
        device, dtype=dtype, head_dim=head_dim, sliding_window=window
    )
    if why is None:
        assert got is None
    else:
        assert why in got


def test_choose_auto_falls_back_and_explicit_cudnn_refuses():
    kw = dict(dtype="bfloat16", head_dim=64)
    assert attention_impl.choose("auto", H100, **kw) == ("cudnn", "")
    assert attention_impl.choose("cudnn", H100, **kw) == ("cudnn", "")
    assert attention_impl.choose("xla", H100, **kw) == ("xla", "")
    kernel, why = attention_impl.choose("auto", Device("cpu"), **kw)
    assert kernel == "xla" and "backend is cpu" in why
    with pytest.raises(ConfigError, match=r"model.attention='cudnn'.*float32.*'auto'.*'xla'"):
        attention_impl.choose("cudnn", H100, dtype="float32", head_dim=64)
    with pytest.raises(ConfigError, match="allowed: xla, cudnn, auto"):
        attention_impl.choose("flash", H100, **kw)


def test_auto_resolves_to_xla_on_cpu_and_says_why_once(capsys):
    for _ in range(3):  # every layer and every model built asks again
        got = attention_impl.resolve("auto", dtype="bfloat16", head_dim=64)
        assert got == "xla"
    lines = [line for line in capsys.readouterr().out.splitlines() if "model.attention" in line]
    assert lines == [
        "jtrain: model.attention=auto: XLA attention (not cuDNN: it runs on NVIDIA GPUs only "
        "and this run's backend is cpu)"
    ]


def test_auto_resolves_to_cudnn_on_a_gpu_saying_so(monkeypatch, capsys):
    monkeypatch.setattr(attention_impl, "this_device", lambda: H100)
    assert attention_impl.resolve("auto", dtype="bfloat16", head_dim=64) == "cudnn"
    assert "model.attention=auto: cuDNN fused attention" in capsys.readouterr().out


def _tiny(**changes):
    config = config_lib.load("tiny")
    for key, value in changes.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def test_validate_refuses_explicit_cudnn_where_it_cannot_run(monkeypatch):
    with pytest.raises(ConfigError, match="backend is cpu.*'auto'"):
        config_lib.validate(_tiny(**{"model.attention": "cudnn", "model.dtype": "bfloat16"}))
    config_lib.validate(_tiny(**{"model.attention": "auto"}))  # auto never refuses
    monkeypatch.setattr(attention_impl, "this_device", lambda: H100)
    gpu_ok = {"model.attention": "cudnn", "model.dtype": "bfloat16"}
    config_lib.validate(_tiny(**gpu_ok))
    with pytest.raises(ConfigError, match="train.seq_len=33.*even"):
        config_lib.validate(_tiny(**gpu_ok, **{"train.seq_len": 33}))
    config_lib.validate(_tiny(**gpu_ok, **{"train.seq_len": 33, "data.packing": False}))
    with pytest.raises(ConfigError, match="mesh.rules.head_dim='tensor'"):
        config = _tiny(**gpu_ok)
        config.mesh.rules.head_dim = "tensor"
        config_lib.validate(config)


def test_kernel_for_call_sends_odd_masked_training_shapes_to_xla():
    call = attention_impl.kernel_for_call
    assert call("cudnn", masked=False, length=33) == "cudnn"
    assert call("cudnn", masked=True, length=32) == "cudnn"
    assert call("cudnn", masked=True, length=33) == "xla"
    assert call("xla", masked=False, length=32) == "xla"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("steps", [1, 3])  # a decoding step; a prefill
def test_cached_attention_equals_jaxs_on_the_same_keys(dtype, steps):
    # The decode path's grouped attention over [B, G, S, K] against
    # jax.nn.dot_product_attention over [B, S, G, K]: the last `steps` of 12 slots as new
    # queries, a padded slot and a causal edge per row.
    q, k, v = (x.astype(dtype) for x in _qkv(length=12))
    q = q[:, -steps:]
    slots = jnp.arange(12)
    mask_Bx1xTxS = (slots[None, None, None, :] <= slots[None, None, -steps:, None]) & (
        slots >= jnp.array([0, 2])[:, None]
    )[:, None, None, :]
    want = jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xTxS)
    got = attention_impl.attend_cached(q, k.transpose(0, 2, 3, 1), v.swapaxes(1, 2), mask_Bx1xTxS)
    assert got.dtype == want.dtype
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2  # bfloat16: 8 bits of mantissa
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance, rtol=tolerance
    )


def _qkv(length=12, heads=4, kv_heads=2, width=8):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, length, heads, width), jnp.float32)
    k = jax.random.normal(keys[1], (2, length, kv_heads, width), jnp.float32)
    v = jax.random.normal(keys[2], (2, length, kv_heads, width), jnp.float32)
    return q, k, v


def _reference(q, k, v, keep_BxLxL):
    """Plain softmax attention, each key/value head repeated for its query group."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("blhk,bshk->bhls", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(keep_BxLxL[:, None], scores, -jnp.inf)
    return jnp.einsum("bhls,bshk->blhk", jax.nn.softmax(scores, axis=-1), v)


SEGMENTS = jnp.array([[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [2] * 3 + [0] * 2])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_xla_path_is_todays_call_and_right(packed, window):
    q, k, v = _qkv()
    mask = layers.attention_mask(SEGMENTS) if packed else None
    local = (window - 1, 0) if window else None
    got = jax.jit(
        attention_impl.attend, static_argnames=("causal", "local_window", "implementation")
    )(q, k, v, mask=mask, causal=True, local_window=local, implementation="xla")
    before = jax.jit(
        jax.nn.dot_product_attention,
        static_argnames=("is_causal", "local_window_size", "implementation"),
    )(q, k, v, mask=mask, is_causal=True, local_window_size=local, implementation=None)
    np.testing.assert_array_equal(got, before)  # what Attention called until now, bit for bit
    pos = jnp.arange(12)
    keep = (pos[None, :, None] >= pos[None, None, :]) & jnp.ones((2, 1, 1), bool)
    if window:
        keep &= pos[None, :, None] - pos[None, None, :] < window
    if packed:
        keep &= SEGMENTS[:, :, None] == SEGMENTS[:, None, :]
    np.testing.assert_allclose(got, jax.jit(_reference)(q, k, v, keep), rtol=1e-5, atol=1e-6)


def test_segments_reach_cudnn_as_the_mask(monkeypatch):
    """On a GPU, a packed batch's documents reach jax's cuDNN path as the dense mask."""
    monkeypatch.setattr(attention_impl, "this_device", lambda: H100)
    calls = []

    def spy(q, k, v, **kwargs):
        calls.append(kwargs)
        return jnp.zeros_like(q)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    cfg = TransformerConfig(**SMALL, dtype="bfloat16", attention="cudnn")

    def attend(length):  # traced only (no compiling): the spy sees the concrete mask
        x = jnp.ones((2, length, 32), jnp.bfloat16)
        positions = jnp.broadcast_to(jnp.arange(length), (2, length))
        mask = layers.attention_mask(SEGMENTS[:, :length])
        jax.eval_shape(lambda: layers.Attention(cfg, rngs=nnx.Rngs(0))(x, positions, mask)[0])

    attend(12)
    attend(11)
    assert [c["implementation"] for c in calls] == ["cudnn", None]  # odd length: XLA
    assert calls[0]["is_causal"] is True
    np.testing.assert_array_equal(calls[0]["mask"], layers.attention_mask(SEGMENTS))


def test_model_with_auto_on_cpu_computes_what_xla_does(capsys):
    @jax.jit  # one program for both models: far faster to build than op by op
    def logits(tokens):
        out = {}
        for attention in ("xla", "auto"):
            cfg = TransformerConfig(**SMALL, attention=attention)
            out[attention] = Transformer(cfg, rngs=nnx.Rngs(0))(tokens, segment_ids_BxL=SEGMENTS)
        return out

    out = logits(jax.random.randint(jax.random.key(1), (2, 12), 0, 64))
    np.testing.assert_array_equal(out["auto"], out["xla"])
    assert capsys.readouterr().out.count("model.attention=auto: XLA attention") == 1
