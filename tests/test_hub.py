"""Hugging Face Hub ids (hf:org/name[@revision]) resolve through the Hub's cache, offline: a
run, jtrain.generate and jtrain.export read the snapshot the cache's ref names; a missing model
is a ConfigError that says what to do; a frozen base pins its commit; a local directory of the
same name wins. The cache is built here in the layout `hf download` writes, with no network.
"""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from jtrain import config as config_lib
from jtrain import export, frozen_sources, generate, pretrained, run, serve
from jtrain.checkpoint import CheckpointError
from jtrain.validation import ConfigError
from tests.conftest import tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_numpy = pytest.importorskip("safetensors.numpy")

REPO = "org/name"
MAIN, V1 = "a" * 40, "b" * 40  # the commits `main` and the tag `v1` name


def _save_llama(path, layers: int) -> str:
    """A random tiny Llama saved by transformers (the files a Hub repo holds)."""
    torch.manual_seed(layers)
    config = transformers.LlamaConfig(
        vocab_size=384,  # >= the byte tokenizer's 259 ids
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return str(path)


def _put_in_cache(cache, repo_id: str, commit: str, model_dir: str, refs=()) -> str:
    """Lays model_dir out as the Hub cache does: contents in blobs/, the commit's snapshot of
    links to them, and refs/NAME holding the commit. Returns the snapshot folder."""
    root = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(root, "snapshots", commit)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    os.makedirs(snapshot)
    for name in os.listdir(model_dir):
        with open(os.path.join(model_dir, name), "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(root, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    for ref in refs:
        with open(os.path.join(root, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An offline Hub cache holding org/name at `main` (2 layers) and `v1` (1 layer), and a
    repo whose snapshot lacks its weights."""
    models, cache = tmp_path_factory.mktemp("models"), str(tmp_path_factory.mktemp("hub"))
    main = _save_llama(models / "main", layers=2)
    _put_in_cache(cache, REPO, MAIN, main, refs=("main",))
    _put_in_cache(cache, REPO, V1, _save_llama(models / "v1", layers=1), refs=("v1",))
    partial = models / "partial"
    partial.mkdir()
    shutil.copy(os.path.join(main, "config.json"), partial)
    _put_in_cache(cache, "org/partial", MAIN, str(partial), refs=("main",))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HUB_CACHE", cache)
        yield {"cache": cache, "main": main}


def _snapshot(hub, commit: str) -> str:
    return os.path.join(hub["cache"], "models--org--name", "snapshots", commit)


def test_a_hub_id_resolves_to_the_snapshot_its_revision_names(hub):
    assert pretrained.hf_path(f"hf:{REPO}") == _snapshot(hub, MAIN)
    assert pretrained.hf_path(f"hf:{REPO}@v1") == _snapshot(hub, V1)
    assert pretrained.hf_path(f"hf:{REPO}@{V1}") == _snapshot(hub, V1)
    config = tiny_config(model__init_from=f"hf:{REPO}@v1")
    config_lib.prepare(config)
    assert config.model.n_layers == 1 and config.model.n_heads == 4  # v1's config.json
    assert serve.model_name(f"hf:{REPO}@v1") == REPO


@pytest.mark.parametrize(
    ("spec", "download"),
    [("org/missing", "download org/missing`"), (f"{REPO}@v9", f"download {REPO} --revision v9`")],
)
def test_a_model_the_cache_lacks_is_a_config_error_saying_what_to_do(hub, spec, download):
    config = tiny_config(model__init_from=f"hf:{spec}")
    with pytest.raises(ConfigError) as raised:
        config_lib.prepare(config)  # validation: before anything is built or compiled
    message = str(raised.value)
    assert f"hf:{spec} is not a local directory nor in the Hugging Face cache at" in message
    assert hub["cache"] in message and "HF_HUB_OFFLINE is set" in message
    assert download in message and "HF_HUB_CACHE" in message and "hf:/path/to/dir" in message
    with pytest.raises(ValueError, match=f"--model=hf:{spec}: .*{download}"):
        generate.load(f"hf:{spec}")


def test_a_cached_snapshot_without_weights_says_so(hub):
    problem = pretrained.check("hf:org/partial")
    assert "its snapshot in the Hugging Face cache" in problem
    assert "lacks safetensors weights" in problem and "download org/partial`" in problem


def test_a_local_directory_wins_over_the_hub_id(hub, tmp_path, monkeypatch):
    shutil.copytree(_snapshot(hub, V1), tmp_path / "org" / "name")  # v1's files, not main's
    monkeypatch.chdir(tmp_path)
    assert pretrained.hub_id(f"hf:{REPO}") is None
    assert pretrained.hf_path(f"hf:{REPO}") == REPO
    config = tiny_config(model__init_from=f"hf:{REPO}")
    config_lib.prepare(config)
    assert config.model.n_layers == 1


def test_generate_loads_the_model_of_the_hub_id(hub):
    from_hub = generate.load(f"hf:{REPO}")
    local = generate.load(f"hf:{hub['main']}")
    assert from_hub.model.cfg == local.model.cfg and from_hub.model.cfg.n_layers == 2
    from flax import nnx

    for a, b in zip(*(jax.tree.leaves(nnx.state(g.model)) for g in (from_hub, local)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def lora_run(hub, tmp_path_factory):
    """A LoRA step on org/name's `main`, its frozen base read from the cache."""
    workdir = str(tmp_path_factory.mktemp("lora"))
    config = tiny_config(
        model__init_from=f"hf:{REPO}",
        train__steps=1,
        train__batch_size=8,
        eval__every_steps=0,
        eval__steps=1,
        checkpoint__every_steps=0,
        schedule__warmup_steps=0,
    )
    config.model.lora.update(rank=4, alpha=8.0)
    run.train_and_evaluate(config, workdir)
    return workdir


def test_a_lora_run_starts_from_the_hub_model_and_pins_its_commit(hub, lora_run, tmp_path):
    with open(os.path.join(lora_run, frozen_sources.FILE)) as f:
        pins = json.load(f)
    assert [pin["version"] for pin in pins.values()] == [{"commit": MAIN}]
    # The export rebuilds the frozen base from the cache: its untouched weights are main's.
    export.export_hf(lora_run, str(tmp_path / "out"))
    exported = st_numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    original = st_numpy.load_file(os.path.join(_snapshot(hub, MAIN), "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        np.testing.assert_array_equal(exported[name], original[name])


def test_a_run_refuses_a_base_whose_revision_moved(hub, lora_run, tmp_path, monkeypatch):
    moved = tmp_path / "hub"
    shutil.copytree(hub["cache"], moved, symlinks=True)
    (moved / "models--org--name" / "refs" / "main").write_text(V1)  # `hf download` got a newer main
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))
    with pytest.raises(CheckpointError, match=f"now names commit {V1}, not {MAIN}.*@{MAIN}"):
        export.export_hf(lora_run, str(tmp_path / "out"))


def test_an_unreachable_hub_is_an_error_saying_what_to_do(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, but the Hub's address refuses
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    problem = pretrained.check("hf:org/unreachable")
    assert "nor in the Hugging Face cache" in problem and "the Hub cannot be reached (" in problem
    assert "download org/unreachable`" in problem
    assert pretrained.check(f"hf:{REPO}") is None  # a cached model needs no Hub


def test_a_hub_tokenizer_is_named_by_its_commit_and_read_from_any_cache(hub, tmp_path, monkeypatch):
    """data.tokenizer of a Hub model is `hf:org/name@COMMIT`, not the cache's path, so a run
    resumed on a machine whose cache lies elsewhere names the same tokenizer (the workdir guard
    compares it), and it reads through that machine's cache."""
    import tokenizers as hf_tokenizers

    from jtrain.data import tokenizers

    model = tmp_path / "model"
    shutil.copytree(hub["main"], model)
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer=trainer)
    tok.save(str(model / "tokenizer.json"))
    specs = []
    for cache in ("cache_a", "cache_b"):  # two machines' caches
        _put_in_cache(str(tmp_path / cache), "org/tok", MAIN, str(model), refs=("main",))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / cache))
        config = tiny_config(model__init_from="hf:org/tok")
        config_lib.prepare(config)
        specs.append(config.data.tokenizer)
        ids = tokenizers.get_tokenizer(config.data.tokenizer).encode("return x", add_eos=False)
        direct = tokenizers.get_tokenizer(str(model)).encode("return x", add_eos=False)
        assert list(ids) == list(direct) and tok.encode("return x").ids == list(ids)[1:]
    assert specs == [f"hf:org/tok@{MAIN}"] * 2
