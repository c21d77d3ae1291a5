"""Starting from existing weights and handing them back: init_from=hf:PATH takes a Hugging Face
model's architecture and weights, the run validates the starting point at step 0, and
`jtrain.export` writes the trained run as a model that transformers loads with the same logits.
Also the continued-pretraining recipe and its embedded corpus.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jtrain import config as config_lib
from jtrain import export, run, runs
from jtrain.data import embedded, pipeline, sources
from jtrain.metrics import read_metrics
from tests.conftest import REPO, tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random Llama 3-style model (GQA, untied, rope_theta 5e5) saved by transformers."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = transformers.LlamaConfig(
        vocab_size=384,  # >= the byte tokenizer's 259 ids
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500_000.0,
        tie_word_embeddings=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # unit norms and small weights would hide layout mistakes
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.fixture(scope="module")
def finetuned(llama_dir, tmp_path_factory):
    """Four steps of fine-tuning the Hugging Face model on the embedded corpus."""
    path, _ = llama_dir
    workdir = str(tmp_path_factory.mktemp("finetuned"))
    config = tiny_config(
        model__init_from=f"hf:{path}",
        train__steps=4,
        eval__every_steps=2,
        checkpoint__every_steps=2,
        schedule__warmup_steps=0,
        data__packing=False,  # plain causal rows, as transformers computes them
    )
    run.train_and_evaluate(config, workdir)
    return workdir, config


def test_hf_init_from_takes_the_architecture_from_config_json(finetuned):
    workdir, _ = finetuned
    model = json.load(open(os.path.join(workdir, "config.json")))["model"]
    assert (model["d_model"], model["n_layers"], model["n_heads"], model["n_kv_heads"]) == (
        64, 2, 4, 2,
    )  # fmt: skip
    assert model["head_dim"] == 16 and model["d_ff"] == 128 and model["vocab_size"] == 384
    assert model["rope_theta"] == 500_000.0 and model["tie_embeddings"] is False
    assert model["max_seq_len"] == 64 and model["norm_eps"] == 1e-6


def _transformers_val_loss(model, config) -> float:
    """The mean next-token NLL of a transformers model over the run's validation batches."""
    nll_sum = weight = 0.0
    for batch in pipeline.eval_batches(config, "val"):
        logits = torch.tensor(_torch_logits(model, batch["inputs"]), dtype=torch.float64)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            torch.tensor(batch["targets"]).reshape(-1).long(),
            reduction="none",
        ).numpy()
        nll_sum += float(np.sum(nll * batch["loss_weight"].reshape(-1)))
        weight += float(batch["loss_weight"].sum())
    return nll_sum / weight


def test_step_zero_validation_is_the_hugging_face_models_loss(finetuned, llama_dir):
    workdir, config = finetuned
    _, reference = llama_dir
    val = [e for e in read_metrics(workdir) if e["split"] == "val"]
    assert [e["step"] for e in val] == [0, 2, 4]
    # f32 logits agree within ~1e-6 (tests/test_hf.py), so the mean NLL within ~1e-5.
    assert val[0]["loss"] == pytest.approx(_transformers_val_loss(reference, config), rel=1e-5)
    assert val[-1]["loss"] < val[0]["loss"]  # and fine-tuning moved it


def test_a_lora_run_exports_merged_with_the_adapted_models_loss(llama_dir, tmp_path):
    path, _ = llama_dir
    config = tiny_config(
        model__init_from=f"hf:{path}",
        train__steps=3,
        eval__every_steps=3,
        schedule__warmup_steps=0,
        optimizer__lr=3e-2,  # adapters start at zero: move them visibly in three steps
        data__packing=False,
    )
    config.model.lora.update(rank=4, alpha=8.0, targets="all")
    run.train_and_evaluate(config, str(tmp_path / "run"))
    export.export_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    val = [e for e in read_metrics(str(tmp_path / "run")) if e["split"] == "val"]
    assert val[-1]["loss"] < val[0]["loss"] - 1e-3  # the adapters changed the model
    # The run evaluated base + adapters unmerged; transformers sees them folded into W.
    assert val[-1]["loss"] == pytest.approx(_transformers_val_loss(merged, config), rel=1e-5)


def test_export_writes_the_trained_weights_for_transformers(finetuned, llama_dir, tmp_path):
    workdir, _ = finetuned
    _, original = llama_dir
    out = str(tmp_path / "exported")
    assert export.export_hf(workdir, out) == "llama"
    tokens = np.random.default_rng(0).integers(0, 259, (2, 24))
    trained = np.asarray(runs.trained_model(workdir)(jnp.asarray(tokens)))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), trained, atol=1e-5)
    assert np.max(np.abs(_torch_logits(original, tokens) - trained)) > 1e-3


def test_a_relative_workdir_exports(finetuned, tmp_path, monkeypatch):
    workdir, _ = finetuned
    monkeypatch.chdir(os.path.dirname(workdir))
    export.export_hf(os.path.basename(workdir), "relative_out")
    assert os.path.isfile(os.path.join(os.path.dirname(workdir), "relative_out", "config.json"))


def test_export_of_an_earlier_step_and_refusals(finetuned, tmp_path):
    workdir, _ = finetuned
    export.export_hf(workdir, str(tmp_path / "step2"), step=2, dtype="bfloat16")
    saved = json.load(open(tmp_path / "step2" / "config.json"))
    assert saved["torch_dtype"] == "bfloat16"
    with pytest.raises(FileExistsError):  # never writes over a directory with files in it
        export.export_hf(workdir, str(tmp_path / "step2"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "jtrain.export", f"--workdir={tmp_path}", "--to_hf=x"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "is not a jtrain workdir" in result.stderr


def test_unsupported_hugging_face_architecture_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(config_lib.ConfigError, match="model_type 'falcon' is not supported"):
        config_lib.prepare(tiny_config(model__init_from=f"hf:{tmp_path}"))
    with pytest.raises(config_lib.ConfigError, match="not a Hugging Face model directory"):
        config_lib.prepare(tiny_config(model__init_from=f"hf:{tmp_path}/missing"))


def test_python_stdlib_corpus_is_split_by_module():
    docs = embedded.python_stdlib()
    assert all(len(docs[split]) >= 5 for split in sources.SPLITS)
    assert sum(map(len, docs.values())) > 100  # the top-level modules of the standard library
    seen = [text for split in sources.SPLITS for text in docs[split]]
    assert len(seen) == len(set(seen))  # every module in one split only
    assert docs == embedded.python_stdlib()


def test_continued_pretraining_recipe_needs_its_base_run(tmp_path):
    config = config_lib.load(os.path.join(REPO, "configs/continued_pretraining.py"))
    assert config.data.source == "python_stdlib" and config.optimizer.lr < 3e-3
    config.model.init_from = str(tmp_path / "no-such-run")
    with pytest.raises(config_lib.ConfigError, match="config.model.init_from="):
        config_lib.prepare(config)


def test_hf_init_from_takes_the_directorys_tokenizer_unless_one_is_set(llama_dir, tmp_path):
    import shutil

    import tokenizers as hf_tokenizers

    path = str(tmp_path / "with_tokenizer")
    shutil.copytree(llama_dir[0], path)
    tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer=trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = tiny_config(model__init_from=f"hf:{path}")
    changes = config_lib.prepare(config)
    assert config.data.tokenizer == path and f"data.tokenizer: 'byte' -> {path!r}" in changes
    config = tiny_config(
        model__init_from=f"hf:{path}", data__tokenizer=os.path.join(path, "tokenizer.json")
    )
    config_lib.prepare(config)  # a tokenizer the user named is kept
    assert config.data.tokenizer.endswith("tokenizer.json")
