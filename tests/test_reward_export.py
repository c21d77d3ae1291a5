"""Reward models to and from Hugging Face: a jtrain Scorer exported as its family's
`...ForSequenceClassification` scores sequences as jtrain does (tiny random models, every
layout the exporter writes), comes back with its head, and PAD == EOS is a documented caveat.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_numpy = pytest.importorskip("safetensors.numpy")

from flax import nnx  # noqa: E402

from jtrain import export, pretrained  # noqa: E402
from jtrain.interop import hf  # noqa: E402
from jtrain.models.transformer import Scorer, Transformer, TransformerConfig  # noqa: E402
from jtrain.tasks.reward import sequence_rewards  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

TOL = 1e-5  # f32 scores, max abs difference
PAD, EOS = 1, 2
TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
LAYOUTS = {
    "llama": ("LlamaForSequenceClassification", dict(tie_embeddings=False)),
    # Qwen2: biases on q, k and v only; tied embeddings.
    "qwen2": ("Qwen2ForSequenceClassification", dict(qkv_bias=True)),
    # Mistral: a sliding window shorter than the longer sequences.
    "mistral": ("MistralForSequenceClassification", dict(sliding_window=4)),
    "gpt2": (
        "GPT2ForSequenceClassification",
        dict(
            n_kv_heads=4, norm="layer", positions="learned", qkv_bias=True, out_bias=True,
            mlp_gated=False, mlp_activation="gelu_tanh", mlp_bias=True,
        ),
    ),
}  # fmt: skip
LENGTHS = np.array([12, 3, 7, 10], np.int32)  # right-padded to 12; each ends with EOS


def _random(make, seed: int = 0):
    """The model `make` builds, every parameter drawn at random: zero biases and unit norms
    would hide layout bugs. Drawn with numpy: eager JAX initialisation takes seconds."""
    rng = np.random.default_rng(seed)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))

    def draw(path, a):
        around = 1.0 if str(path[-2].key) == "scale" else 0.0  # norm scales near one
        return jnp.asarray(around + 0.2 * rng.standard_normal(a.shape), a.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


def _config(layout: str, **overrides) -> TransformerConfig:
    return TransformerConfig(**{**TINY, "max_seq_len": 16, **LAYOUTS[layout][1], **overrides})


def _scorer(layout: str, seed: int = 0, **overrides) -> Scorer:
    cfg = _config(layout, **overrides)
    return _random(lambda: Scorer(cfg, outputs=1, rngs=nnx.Rngs(0)), seed)


def _batch(pad: int = PAD) -> np.ndarray:
    """Right-padded rows of LENGTHS tokens, each ending with EOS."""
    rng = np.random.default_rng(0)
    tokens = np.full((len(LENGTHS), LENGTHS.max()), pad, np.int32)
    for row, n in enumerate(LENGTHS):
        tokens[row, : n - 1] = rng.integers(3, TINY["vocab_size"], n - 1)
        tokens[row, n - 1] = EOS
    return tokens


def _torch_inputs(tokens: np.ndarray) -> dict:
    mask = np.arange(tokens.shape[1]) < LENGTHS[:, None]
    return dict(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)))


def _load(path: str):
    return transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()


def _rewards(model, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(sequence_rewards(model, jnp.asarray(tokens), jnp.asarray(LENGTHS)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each layout as a random Scorer, exported with PAD != EOS."""
    torch.set_num_threads(1)
    out = {}
    for layout in LAYOUTS:
        model, path = _scorer(layout), str(tmp_path_factory.mktemp(layout))
        hf.save_model(model, path, pad_token_id=PAD, eos_token_id=EOS)
        out[layout] = (model, path)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exported_scores_equal_jtrain_rewards(exported, layout):
    model, path = exported[layout]
    reloaded = _load(path)
    assert type(reloaded).__name__ == LAYOUTS[layout][0]
    assert reloaded.config.num_labels == 1
    assert (reloaded.config.pad_token_id, reloaded.config.eos_token_id) == (PAD, EOS)
    tokens = _batch()
    with torch.no_grad():
        theirs = reloaded(**_torch_inputs(tokens)).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, _rewards(model, tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_head_is_stored_as_score_weight_without_an_lm_head(exported, layout):
    model, path = exported[layout]
    tensors = st_numpy.load_file(os.path.join(path, "model.safetensors"))
    np.testing.assert_array_equal(tensors["score.weight"], np.asarray(model.score_DxO[...]).T)
    assert "lm_head.weight" not in tensors
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["architectures"] == [LAYOUTS[layout][0]]


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
def test_a_sequence_classifier_imports_with_its_head(exported, layout):
    model, path = exported[layout]
    loaded = hf.load_model(path)
    assert isinstance(loaded, Scorer)
    _assert_same_params(nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))
    # model.init_from=hf:PATH of a reward task: the score head loads with the trunk.
    abstract = _abstract(lambda: Scorer(_config(layout), rngs=nnx.Rngs(0)))
    params = pretrained.load(f"hf:{path}", abstract)
    _assert_same_params(params, nnx.state(model, nnx.Param))


def _assert_same_params(a: nnx.State, b: nnx.State) -> None:
    flat_a, flat_b = dict(nnx.to_flat_state(a)), dict(nnx.to_flat_state(b))
    assert sorted(flat_a) == sorted(flat_b)
    for name, value in flat_a.items():
        np.testing.assert_array_equal(value.get_value(), flat_b[name].get_value(), err_msg=name)


def _abstract(make) -> nnx.State:
    """A model's parameters as model.init_from receives them: shapes with a sharding."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = nnx.state(nnx.eval_shape(make), nnx.Param)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)


def test_the_trunk_loads_across_heads_and_the_other_head_stays_fresh(exported, tmp_path):
    cfg = TransformerConfig(**TINY, tie_embeddings=False)
    lm = _random(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    hf.save_model(lm, str(tmp_path), max_position_embeddings=16)
    # An LM directory into a reward model: the trunk loads, lm_head is not read.
    params = pretrained.load(f"hf:{tmp_path}", _abstract(lambda: Scorer(cfg, rngs=nnx.Rngs(0))))
    assert "score_DxO" not in params
    scorer = _random(lambda: Scorer(cfg, outputs=1, rngs=nnx.Rngs(0)), seed=3)
    fresh_head = np.asarray(scorer.score_DxO[...])
    nnx.update(scorer, params)
    np.testing.assert_array_equal(scorer.embed_VxD[...], lm.embed_VxD[...])
    np.testing.assert_array_equal(scorer.score_DxO[...], fresh_head)
    # A reward model's directory into an LM: the same, the other way round.
    _, path = exported["llama"]
    params = pretrained.load(f"hf:{path}", _abstract(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    assert "unembed_DxV" not in params and "embed_VxD" in params


def test_pad_equal_to_eos_is_read_one_token_early_by_transformers(tmp_path):
    """transformers reads the last non-PAD token; with PAD == EOS that is the one before EOS.
    jtrain reads by length: its reward is the score at the true last token, the EOS."""
    model = _scorer("llama")
    with pytest.warns(UserWarning, match="PAD == EOS"):
        hf.save_model(model, str(tmp_path), pad_token_id=EOS, eos_token_id=EOS)
    reloaded, tokens = _load(str(tmp_path)), _batch(pad=EOS)
    inputs, rows = _torch_inputs(tokens), np.arange(len(LENGTHS))
    with torch.no_grad():
        pooled = reloaded(**inputs).logits[:, 0].numpy()
        per_token = reloaded.score(reloaded.base_model(**inputs).last_hidden_state)[..., 0].numpy()
    ours = _rewards(model, tokens)
    np.testing.assert_allclose(ours, per_token[rows, LENGTHS - 1], atol=TOL, rtol=0)
    np.testing.assert_allclose(pooled, per_token[rows, LENGTHS - 2], atol=TOL, rtol=0)
    assert np.all(np.abs(pooled - ours) > 1e-3)


def test_a_scorer_needs_a_pad_id_inside_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="pad_token_id"):
        hf.save_model(_scorer("llama"), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        hf.save_model(_scorer("llama"), str(tmp_path / "b"), pad_token_id=64)


def test_export_of_a_reward_run_writes_the_tokenizer_pad_and_eos(tmp_path, monkeypatch):
    # The run's reading (`runs.trained_model` builds a reward run's Scorer through its task)
    # is replaced by a ready model: a real run would cost more than the rest of this file.
    config = tiny_config(task="reward", model__vocab_size=384)  # byte ids
    model = _scorer("llama", vocab_size=384, max_seq_len=0)
    monkeypatch.setattr(export, "run_config", lambda workdir: config)
    monkeypatch.setattr(export, "trained_model", lambda workdir, step=None: model)
    assert export.export_hf("run", str(tmp_path)) == "llama"
    hf_config = json.load(open(tmp_path / "config.json"))
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    ids = [hf_config[f"{role}_token_id"] for role in ("bos", "eos", "pad")]
    assert ids == [257, 258, 256]
    assert hf_config["max_position_embeddings"] == config.train.seq_len
