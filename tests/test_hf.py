"""Hugging Face interop: logits match transformers (PyTorch, CPU) for every supported family,
export reloads in transformers, sharded loads match, and unsupported options are errors.
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

from jtrain import mesh as mesh_lib  # noqa: E402
from jtrain import optim  # noqa: E402
from jtrain.interop import hf  # noqa: E402

TOL = 2e-4  # f32 logits, max abs difference
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
FAMILIES = {
    # Llama 3.1: untied, GQA, llama3 frequency scaling with all three frequency bands in use.
    "llama3": transformers.LlamaConfig(
        **TINY,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    # Llama 3.2-like: tied, head_dim != hidden / heads, biases, linear scaling, rope_theta.
    "llama_tied_bias": transformers.LlamaConfig(
        **TINY,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_theta=500_000.0,
        rope_scaling=dict(rope_type="linear", factor=2.0),
    ),
    # Mistral 7B v0.1: a sliding window shorter than the test sequence; multi-query attention.
    "mistral": transformers.MistralConfig(
        **TINY, num_attention_heads=4, num_key_value_heads=1, sliding_window=5
    ),
    # Qwen2.5: q/k/v biases, tied, large rope_theta.
    "qwen2": transformers.Qwen2Config(
        **TINY,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
    ),
    "gpt2": transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32),
}
# Sharded over all four logical axes of attention, head_dim included, so that every way of
# reading a slice of a stored tensor is exercised.
RULES = dict(
    batch="data", embed="fsdp", mlp="tensor", heads="tensor", kv_heads="tensor",
    vocab="tensor", head_dim="data", layers="",
)  # fmt: skip


def _tokens(length=16):
    return np.random.default_rng(0).integers(0, 128, (2, length))


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def noisy_model(config):
    """A transformers model of `config`, seeded, with noise on every parameter: zero biases
    and unit norms would hide layout bugs."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each family as a randomly initialised transformers model saved to its own directory."""
    torch.set_num_threads(1)
    dirs = {}
    for name, config in FAMILIES.items():
        model = noisy_model(config)
        path = str(tmp_path_factory.mktemp(name))
        # Small shards for one family, so that the index path is covered too.
        shard = "30KB" if name == "llama3" else "1GB"
        model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
        dirs[name] = (path, _torch_logits(model, _tokens()))
    return dirs


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(hf_dirs, name):
    path, expected = hf_dirs[name]
    logits = hf.load_model(path)(jnp.asarray(_tokens()))
    assert logits.shape == (2, 16, 128)
    assert np.max(np.abs(np.asarray(logits) - expected)) < TOL


def test_sharded_index_was_written(hf_dirs):
    assert os.path.exists(os.path.join(hf_dirs["llama3"][0], "model.safetensors.index.json"))


@pytest.mark.parametrize("name", FAMILIES)
def test_export_reloads_in_transformers(hf_dirs, tmp_path, name):
    path, expected = hf_dirs[name]
    model = hf.load_model(path)
    # The family is inferred from the model's options; tiny shards: the index must load too.
    hf.save_model(model, str(tmp_path), max_shard_bytes=50_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    original = json.load(open(os.path.join(path, "config.json")))
    assert json.load(open(tmp_path / "config.json"))["model_type"] == original["model_type"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(_torch_logits(reloaded, _tokens()), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["llama3", "gpt2"])
def test_sharded_load_places_shards_and_matches(hf_dirs, name):
    path, expected = hf_dirs[name]
    mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    model = hf.load_model(path, mesh=mesh, rules=mesh_lib.parse_rules(RULES))
    q = model.blocks.attn.q_DxHxK[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", "data")
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 8)
    logits = jax.jit(lambda t: model(t))(jnp.asarray(_tokens()))
    assert np.max(np.abs(np.asarray(logits) - expected)) < TOL


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers(hf_dirs, tmp_path):
    # openai-community/gpt2's model.safetensors names tensors "h.0..." and stores attn.bias.
    path, expected = hf_dirs["gpt2"]
    tensors = st_numpy.load_file(os.path.join(path, "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    st_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    os.symlink(os.path.join(path, "config.json"), tmp_path / "config.json")
    logits = hf.load_model(str(tmp_path))(jnp.asarray(_tokens()))
    assert np.max(np.abs(np.asarray(logits) - expected)) < TOL


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES["qwen2"]).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    loaded = hf.load_model(str(tmp_path), param_dtype="bfloat16")
    q_proj = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H*K, D]
    ours = np.asarray(loaded.blocks.attn.q_DxHxK[...][1].astype(jnp.float32))  # [D, H, K]
    np.testing.assert_array_equal(ours.reshape(64, -1).T, q_proj)


def _config(**overrides):
    base = FAMILIES["llama3"].to_dict()
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None or k in overrides}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model_type="gemma"), "model_type 'gemma'"),
        (dict(architectures=["LlamaForTokenClassification"]), "LlamaForTokenClassification"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_parameters=dict(rope_type="yarn", factor=4.0)), "rope type 'yarn'"),
        (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0)), "rope type 'dynamic'"),
        (dict(quantization_config={"bits": 4}), "quantization_config"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ],
)
def test_unsupported_config_is_an_error_naming_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf(_config(**overrides))


def test_qwen2_mixed_sliding_window_layers_are_an_error():
    config = FAMILIES["qwen2"].to_dict()
    config.update(use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None)
    with pytest.raises(ValueError, match="sliding"):
        hf.config_from_hf(config)


def test_missing_or_unexpected_tensors_are_errors(hf_dirs, tmp_path):
    path, _ = hf_dirs["qwen2"]
    config = json.load(open(os.path.join(path, "config.json")))
    json.dump({**config, "num_hidden_layers": 3}, open(tmp_path / "config.json", "w"))
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.2.self_attn.q_proj.weight: missing"):
        hf.load_model(str(tmp_path))
    json.dump({**config, "num_hidden_layers": 1}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight: unexpected"):
        hf.load_model(str(tmp_path))


def test_pickle_checkpoints_are_refused(hf_dirs, tmp_path):
    path, _ = hf_dirs["gpt2"]
    os.symlink(os.path.join(path, "config.json"), tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf.load_model(str(tmp_path))


def test_export_refuses_what_the_family_cannot_express(hf_dirs, tmp_path):
    model = hf.load_model(hf_dirs["gpt2"][0])
    with pytest.raises(ValueError, match="a llama model cannot have model.norm='layer'"):
        hf.save_model(model, str(tmp_path), family="llama")
    qwen = hf.load_model(hf_dirs["qwen2"][0])
    with pytest.raises(ValueError, match="a mistral model cannot have model.qkv_bias=True"):
        hf.save_model(qwen, str(tmp_path), family="mistral")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not empty"):
        hf.save_model(qwen, str(tmp_path))


def test_only_matrices_and_embeddings_get_weight_decay(hf_dirs):
    model = hf.load_model(hf_dirs["gpt2"][0])
    mask = optim.decay_mask(nnx.state(model, nnx.Param))
    decayed = {".".join(map(str, k)) for k, v in nnx.to_flat_state(mask) if v.get_value()}
    attn, mlp = "blocks.attn.", "blocks.mlp."
    matrices = {attn + "q_DxHxK", attn + "k_DxGxK", attn + "v_DxGxK", attn + "o_HxKxD"}
    matrices |= {mlp + "up_DxF", mlp + "down_FxD", "embed_VxD", "pos_embed_LxD"}
    assert decayed == matrices
