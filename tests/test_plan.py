"""jtrain.plan: parameter counts equal to transformers', memory from the real shardings, the
activation formula's remat policies, time and cost, the suggested mesh, and its errors."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from jtrain import aot, errors, plan, plan_report, pretrained
from jtrain import config as config_lib
from jtrain.models.transformer import TransformerConfig

# transformers' num_parameters() for Meta-Llama-3-8B and -70B (LlamaConfig with the recipes'
# shapes, built on the meta device, transformers 5.24).
LLAMA3_8B_PARAMS = 8_030_261_248
LLAMA3_70B_PARAMS = 70_553_706_496


def _plan(name: str, accelerator: str = "v5p", chips: int = 1, **overrides) -> dict:
    config = config_lib.load(name)
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        target = config
        for part in section.split("."):
            target = target[part]
        target[field] = value
    return plan.make_plan(config, accelerator, chips, 0.4, 2.0)


@pytest.fixture(scope="module")
def llama8b_h100() -> dict:
    return _plan("llama3_8b", "h100", 8, **{"train.microbatches": 1})


def test_llama3_recipes_have_metas_parameter_counts(llama8b_h100):
    assert llama8b_h100["params"] == LLAMA3_8B_PARAMS
    assert _plan("llama3_70b", chips=256)["params"] == LLAMA3_70B_PARAMS


HF_LAYOUTS = {
    # transformers config class, its kwargs, the same architecture as jtrain model.* keys.
    "llama": (
        "LlamaConfig",
        dict(num_key_value_heads=2, tie_word_embeddings=False),
        dict(n_kv_heads=2, tie_embeddings=False),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(num_key_value_heads=2, tie_word_embeddings=True),
        dict(n_kv_heads=2, tie_embeddings=True, qkv_bias=True),
    ),
    "gpt2": (
        "GPT2Config",
        dict(n_positions=64),
        dict(
            n_kv_heads=4, tie_embeddings=True, norm="layer", positions="learned", max_seq_len=64,
            qkv_bias=True, out_bias=True, mlp_gated=False, mlp_activation="gelu_tanh",
            mlp_bias=True, d_ff=256,
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(HF_LAYOUTS))
def test_parameter_count_equals_transformers(family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    class_name, hf_kwargs, jtrain_keys = HF_LAYOUTS[family]
    sizes = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family == "gpt2":
        sizes = dict(vocab_size=384, n_embd=64, n_layer=2, n_head=4)
    else:
        sizes |= dict(intermediate_size=96, head_dim=16)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            getattr(transformers, class_name)(**sizes, **hf_kwargs)
        )
    keys = dict(vocab_size=384, d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=96)
    keys = {f"model.{k}": v for k, v in (keys | jtrain_keys).items()}
    assert _plan("tiny", **keys)["params"] == model.num_parameters()


def test_memory_comes_from_the_shardings(llama8b_h100):
    mem = llama8b_h100["memory_per_device_bytes"]
    # FSDP over 8 GPUs: every float32 parameter split 8 ways; Adam's two moments likewise.
    assert mem["parameters"] == LLAMA3_8B_PARAMS * 4 // 8
    assert mem["gradients"] == mem["parameters"]
    assert 0 <= mem["optimizer_state"] - 2 * mem["parameters"] < 64  # + replicated counters
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    # The same rows per device, with the heads, the MLP and the vocabulary split 2 ways or not.
    fsdp = _plan("llama3_8b", "h100", 4, **{"mesh.fsdp": 4})["memory_per_device_bytes"]
    tensor = _plan("llama3_8b", "h100", 8, **{"mesh.fsdp": 4, "mesh.tensor": 2})
    tensor = tensor["memory_per_device_bytes"]
    assert mem["parameters"] < tensor["parameters"] < fsdp["parameters"]
    assert tensor["activations"] < fsdp["activations"]


def test_flops_tokens_time_and_cost(llama8b_h100):
    p, seq_len = llama8b_h100, 8192
    config = config_lib.load("llama3_8b")
    per_token = TransformerConfig.from_mapping(config.model).flops_per_token(seq_len)
    assert p["flops_per_token"] == pytest.approx(per_token)
    assert p["tokens"] == config.train.steps * config.train.batch_size * seq_len
    assert p["chinchilla_tokens"] == 20 * LLAMA3_8B_PARAMS
    step = per_token * seq_len * config.train.batch_size / (8 * 989e12 * 0.4)
    assert p["step_time_s"] == pytest.approx(step)
    assert p["chip_hours"] == pytest.approx(8 * step * config.train.steps / 3600)
    assert p["cost_usd"] == pytest.approx(2.0 * p["chip_hours"])


def test_remat_attention_and_loss_chunk_shrink_activations():
    def activations(**overrides) -> int:
        keys = {f"model.{k}": v for k, v in overrides.items()}
        keys["train.seq_len"] = 256
        return _plan("tiny", **keys)["memory_per_device_bytes"]["activations"]

    none, dots, full = (activations(remat=r) for r in ("none", "dots", "full"))
    assert full < dots < none
    # The head's chunk matters where its logits outweigh a block's backward pass.
    chunked, whole = (activations(loss_chunk=c, vocab_size=32768) for c in (32, 0))
    assert chunked < whole


def test_cudnn_attention_only_on_nvidia_gpus():
    config = config_lib.load("llama3_8b")
    assert plan.attention_kernel(config, plan.accelerators.get("h100")) == "cudnn"
    assert plan.attention_kernel(config, plan.accelerators.get("v5p")) == "xla"
    config.model.attention = "cudnn"
    with pytest.raises(errors.UserError, match="--accelerator=v5p"):
        plan.attention_kernel(config, plan.accelerators.get("v5p"))


def test_a_mesh_that_does_not_fit_gets_one_that_does(llama8b_h100):
    assert not llama8b_h100["fits"]
    s = llama8b_h100["suggested_mesh"]
    assert s["data"] * s["fsdp"] * s["tensor"] == 8
    again = _plan(
        "llama3_8b",
        "h100",
        8,
        **{"mesh.data": s["data"], "mesh.fsdp": s["fsdp"], "mesh.tensor": s["tensor"]},
        **{"train.microbatches": s["microbatches"]},
    )
    assert again["fits"] and again["memory_per_device_bytes"]["total"] == s["total_bytes"]


def test_frozen_parts_are_counted_with_their_dtype(tmp_path, monkeypatch):
    lora = _plan("lora", **{"model.lora.base_dtype": "bfloat16"})
    assert lora["frozen_dtypes"] == {"base": "bfloat16"}
    assert lora["params"] == lora["params_trained"] + lora["frozen_parts"]["base"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n' * 8)
    # The recipe's SFT run and pairs are made by examples/arithmetic_chain.py: stand-ins here
    # (a plan reads no weights, so the SFT run's directory need not exist).
    monkeypatch.setattr(pretrained, "check", lambda spec: None)
    dpo = _plan("arithmetic_dpo", **{"data.source": f"files:{pairs}"})
    assert dpo["frozen_parts"] == {"reference": dpo["params"]}


@pytest.mark.parametrize(
    ("accelerator", "chips", "mfu", "price", "flag"),
    [
        ("tpu9", 1, 0.4, 0.0, "--accelerator='tpu9' is invalid: allowed: v4, v5e"),
        ("v5e", 6, 0.4, 0.0, "--chips=6 does not fit the config's mesh"),
        ("v5e", 1, -0.1, 0.0, "--mfu=-0.1 is invalid"),
        ("v5e", 1, 0.4, -1.0, "--price=-1.0 is invalid"),
    ],
)
def test_bad_flags_name_the_flag(accelerator, chips, mfu, price, flag):
    config = config_lib.load("tiny")
    config.mesh.data, config.mesh.tensor = 1, 4
    with pytest.raises(errors.UserError) as err:
        plan.make_plan(config, accelerator, chips, mfu, price)
    assert flag in str(err.value) and "\n" not in str(err.value)


def test_aot_figures_are_shown_beside_the_estimate(monkeypatch, llama8b_h100):
    compiled = {"arguments": 1, "outputs": 2, "temporaries": 3 * 2**30, "total": 4 * 2**30}

    class FakeAot:
        @staticmethod
        def compile_report(config, topology):
            report = {"topology": topology, "chips": 8, "flops_per_step": 1e17}
            return report | {"memory_per_device_bytes": compiled, "compile_s": 12.0}

    monkeypatch.setattr(plan, "aot", FakeAot)
    shown = plan.with_compiled(dict(llama8b_h100), None, "v5p:2x2x2")
    text = plan_report.render(shown | {"config": "llama3_8b"})
    assert "compiled for v5p:2x2x2 by XLA in 12 s" in text and "4.00 GiB" in text
    with pytest.raises(errors.UserError, match="--aot=v5p:4x4x4 has 8 chips"):
        plan.with_compiled(dict(llama8b_h100, chips=64), None, "v5p:4x4x4")
    monkeypatch.setattr(plan, "aot", None)
    with pytest.raises(errors.UserError, match="--aot needs jtrain.aot"):
        plan.with_compiled(dict(llama8b_h100), None, "v5p:2x2x2")
    assert plan.topology_chips("v5p:4x4x8") == 128 and plan.topology_chips("odd") is None


def test_command_prints_one_json_object_and_errors_in_one_line():
    command = [sys.executable, "-m", "jtrain.plan", "--config=tiny", "--chips=8", "--json"]
    done = subprocess.run(command + ["--accelerator=v5e"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for key in ("params", "flops_per_token", "chinchilla_tokens", "tokens", "fits"):
        assert key in out
    assert out["memory_per_device_bytes"]["total"] > 0 and out["cost_usd"] is None
    assert math.isclose(out["chip_hours"], 8 * out["run_time_s"] / 3600)
    bad = subprocess.run(command + ["--accelerator=x"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"error: --accelerator='x' is invalid: allowed: {', '.join(plan.accelerators.ACCELERATORS)}"
    ]


# XLA's memory for small variants of the 8B recipe on v5p:2x2x1 (benchmarks/plan_calibration.py).
GOLDEN = pathlib.Path(__file__).parent / "golden" / "plan_memory.json"
# How far the plan's temporaries (gradients, activations, gathered weights) may be from XLA's.
TOLERANCE = 0.25


def _temporaries(p: dict) -> int:
    mem = p["memory_per_device_bytes"]
    return mem["gradients"] + mem["activations"] + mem["gathered_weights"]


@pytest.mark.parametrize(
    "case", json.loads(GOLDEN.read_text())["cases"], ids=lambda case: case["name"]
)
def test_estimate_is_within_tolerance_of_xlas_compiled_temporaries(case):
    p = _plan(json.loads(GOLDEN.read_text())["base"], "v5p", 4, **case["overrides"])
    assert _temporaries(p) == pytest.approx(case["xla"]["temporaries"], rel=TOLERANCE)


def test_estimate_is_within_tolerance_of_a_live_tpu_compile():
    overrides = {
        "model.n_layers": 2,
        "model.d_model": 256,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.head_dim": 64,
        "model.d_ff": 768,
        "model.vocab_size": 2048,
        "model.loss_chunk": 0,
        "train.seq_len": 2048,  # the [1, 4, 2048, 2048] scores dominate
        "train.batch_size": 4,
        "train.microbatches": 1,
    }
    config = config_lib.load("llama3_8b")
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    try:
        report = aot.compile_report(config, "v5p:2x2x1", save_path=False)
    except aot.AotUnavailable as err:
        pytest.skip(str(err))
    compiled = report["memory_per_device_bytes"]["temporaries"]
    assert _temporaries(_plan("llama3_8b", "v5p", 4, **overrides)) == pytest.approx(
        compiled, rel=TOLERANCE
    )


def test_recipes_fit_their_named_topologies():
    # Each also compiled by XLA for its topology: benchmarks/results/aot_llama3.txt.
    assert _plan("llama3_8b", "v5p", 64)["fits"]
    assert _plan("llama3_70b", "v5p", 256)["fits"]
    # Four sequences per chip at a time do not fit (XLA: 248 GiB of temporaries).
    assert not _plan("llama3_8b", "v5p", 64, **{"train.microbatches": 1})["fits"]
