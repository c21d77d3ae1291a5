"""LoRA: adapters start as the identity, only they train and hold optimizer state, the frozen
base passes through the step uncopied, sharded steps match one device, merge equals the
adapted model (and exports to transformers), checkpoints hold adapters only and resume
exactly, and a LoRA run starts from a trained jtrain run.
"""

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtrain import config as config_lib
from jtrain import pretrained, run
from jtrain.data import pipeline
from jtrain.experiment import Experiment
from jtrain.metrics import read_metrics
from jtrain.models import int8, lora
from jtrain.models.transformer import Transformer, TransformerConfig
from jtrain.state import BASE
from tests.conftest import tiny_config, train_losses

STEPS = 4


def tiny(rank=4, **overrides):
    return tiny_config(model__lora__rank=rank, eval__steps=1, train__log_every=1, **overrides)


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnames="graphdef")
def _logits(model_params, tokens, *, graphdef):
    return nnx.merge(graphdef, model_params)(tokens)


def _base_graphdef(config):
    """The graphdef of the task's plain model (no adapters), for the base parameters alone."""
    cfg = TransformerConfig.from_mapping(config.model)
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A full (non-LoRA) run of the tiny model: the pre-trained base that LoRA runs start from."""
    workdir = str(tmp_path_factory.mktemp("base"))
    config = tiny(
        rank=0,
        train__steps=3,
        eval__every_steps=0,
        checkpoint__every_steps=0,
        schedule__warmup_steps=0,
    )
    results = run.train_and_evaluate(config, workdir)
    return workdir, results


def lora_config(base_workdir, **overrides):
    """LoRA on the base run, with dropout, at a constant lr (a run's length changes nothing)."""
    settings = dict(
        model__init_from=base_workdir,
        train__steps=STEPS,
        eval__every_steps=0,
        checkpoint__every_steps=0,
        schedule__name="constant",
        schedule__warmup_steps=0,
    )
    config = tiny(**(settings | overrides))
    config.model.lora.dropout = 0.1  # so that resuming must replay the dropout masks too
    return config


def init_from_base(exp):
    return exp.init_state(base=pretrained.load(exp.config.model.init_from, exp.abstract_base))


@pytest.fixture(scope="module")
def batches(base_run):
    return list(itertools.islice(pipeline.make_train_iterator(lora_config(base_run[0])), STEPS))


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 16)))


@pytest.fixture(scope="module")
def trained(base_run, batches):
    """A LoRA experiment on the base run, its initial state (kept) and its per-step losses,
    stepped directly (no loop, no checkpoints), and the state after STEPS steps."""
    exp = Experiment.from_config(lora_config(base_run[0]))
    initial = init_from_base(exp)
    kept = jax.tree.map(jnp.copy, initial)  # the step donates its input
    state, losses = initial, []
    for batch in batches:
        state, metrics = exp.train_step(state, exp.global_batch(batch))
        losses.append(float(metrics["loss"]))
    return exp, kept, state, losses


def test_zero_init_adapters_give_the_base_models_logits_exactly(trained, tokens):
    exp, initial, _, _ = trained
    base_logits = _logits(initial.frozen, tokens, graphdef=_base_graphdef(exp.config))
    np.testing.assert_array_equal(
        _logits(initial.model_params, tokens, graphdef=exp.graphdef), base_logits
    )


def test_only_adapters_are_trained_and_hold_optimizer_state(trained):
    exp, initial, _, _ = trained
    is_adapter = lambda x: isinstance(x, lora.LoRAParam)  # noqa: E731
    params = jax.tree.leaves(initial.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert params and all(is_adapter(p) for p in params)
    # q, k, v, o of 2 layers: A [64 or 8x8, 4] and B [4, 64 or 8x8 or 4x8].
    assert exp.param_count() == 2 * 4 * (64 * 4 + 4 * 64) - 2 * 2 * (4 * 32)
    full = Experiment.from_config(tiny(rank=0), jax.devices()[:1]).abstract_state
    lora_opt, full_opt = _nbytes(exp.abstract_state.opt_state), _nbytes(full.opt_state)
    # AdamW keeps two moments per trained parameter, plus step counts (8 bytes).
    assert lora_opt == 2 * _nbytes(initial.params) + 8
    assert full_opt == 2 * _nbytes(full.params) + 8
    assert lora_opt < full_opt / 20  # 28.7 KB vs 393 KB for this tiny model
    print(f"optimizer state: LoRA {lora_opt:,} bytes, full fine-tuning {full_opt:,} bytes")


def test_training_changes_adapters_and_leaves_the_base_bitwise(trained):
    _, initial, state, _ = trained
    for a, b in zip(jax.tree.leaves(initial.frozen), jax.tree.leaves(state.frozen), strict=True):
        np.testing.assert_array_equal(a, b)
    b_before = jax.tree.leaves(nnx.state(initial.params, lambda p, _: p[-1] == "b_RxO"))
    b_after = jax.tree.leaves(nnx.state(state.params, lambda p, _: p[-1] == "b_RxO"))
    assert all(np.all(b == 0) for b in b_before)
    assert all(np.any(b != 0) for b in b_after)


def test_the_frozen_base_is_aliased_through_the_step_not_copied(trained, batches):
    exp, _, state, _ = trained
    compiled = exp.train_step.lower(state, exp.global_batch(batches[0])).compile()
    memory = compiled.memory_analysis()
    # Donated and returned unchanged, every state buffer (the base included) is an alias.
    assert memory.alias_size_in_bytes >= _nbytes(state.frozen) + _nbytes(state.params)


def test_targets_by_name_and_pattern():
    cfg = TransformerConfig.from_mapping(tiny().model)

    def adapted(targets):
        def build():
            lora_cfg = lora.LoRAConfig(rank=2, targets=lora.parse_targets(targets))
            return lora.attach(Transformer(cfg, rngs=nnx.Rngs(0)), lora_cfg, nnx.Rngs(1))

        adapters = nnx.state(nnx.eval_shape(build), lora.LoRAParam)
        return {path[-2].split("_")[0] for path, _ in nnx.to_flat_state(adapters)}

    assert adapted("q,v") == {"q", "v"}
    assert adapted("mlp.*") == {"gate", "up", "down"}
    assert adapted("attn.[qk]") == {"q", "k"}
    assert adapted("all") == set(lora.TARGET_NAMES)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("targets", "q,query", "query matches no kernel; give comma-separated names or glob"),
        ("rank", -1, "model.lora.rank=-1 is invalid"),
        ("alpha", 0.0, "model.lora.alpha=0.0 is invalid"),
        ("dropout", 1.0, "model.lora.dropout=1.0 is invalid"),
        ("base_dtype", "int4", "allowed: float32, bfloat16, int8"),
    ],
)
def test_bad_lora_settings_name_the_key(key, value, message):
    config = tiny()
    config.model.lora[key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_a_lower_precision_base_needs_adapters():
    config = tiny(rank=0)
    config.model.lora.base_dtype = "int8"
    with pytest.raises(config_lib.ConfigError, match="needs model.lora.rank > 0"):
        config_lib.validate(config)


def _steps(config, batches, devices=None):
    exp = Experiment.from_config(config, devices)
    state = init_from_base(exp)  # the base read from a checkpoint saved on another mesh
    losses = []
    for batch in batches:
        state, metrics = exp.train_step(state, exp.global_batch(batch))
        losses.append(float(metrics["loss"]))
    return exp, state, losses


def test_sharded_lora_steps_match_one_device(trained, batches):
    exp_8, _, state_8, losses_8 = trained  # data=8 (the runs' mesh: all devices)
    config = exp_8.config.copy_and_resolve_references()
    _, state_1, losses_1 = _steps(config, batches, jax.devices()[:1])
    config.mesh.update(data=2, fsdp=2, tensor=2)
    exp, state, losses = _steps(config, batches)
    adapters_q = state.params["blocks"]["attn"]["lora"]["q_DxHxK"]
    P = jax.sharding.PartitionSpec
    assert adapters_q["a_IxR"].sharding.spec == P(None, "fsdp", None)  # A is split like W's input
    assert adapters_q["b_RxO"].sharding.spec == P(None, None, "tensor", None)  # B like its output
    # Sharding reorders float32 sums only (all-reduces, split matmuls): a few ulps per op,
    # ~1e-6 relative after STEPS steps; 1e-5 leaves a margin.
    for other_losses, other in ((losses, state), (losses_8, state_8)):
        np.testing.assert_allclose(other_losses, losses_1, rtol=1e-5)
        for a, b in zip(
            jax.tree.leaves(other.params), jax.tree.leaves(state_1.params), strict=True
        ):
            np.testing.assert_allclose(a, b, atol=1e-5)


def _with_random_b(state):
    """The state with B matrices far from zero, so that merging has something to fold in."""
    rng = np.random.default_rng(1)

    def randomise(path, x):
        if path[-2].key != "b_RxO":
            return x
        return jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)

    return state.replace(params=jax.tree_util.tree_map_with_path(randomise, state.params))


def test_merge_equals_the_adapter_logits_and_exports_to_transformers(trained, tokens, tmp_path):
    exp, initial, state, _ = trained
    state = _with_random_b(state)
    merged = lora.merge(nnx.merge(exp.graphdef, state.model_params))
    assert not jax.tree.leaves(nnx.state(merged, lora.LoRAParam))
    logits = _logits(state.model_params, tokens, graphdef=exp.graphdef)
    merged_logits = _logits(nnx.state(merged), tokens, graphdef=nnx.graphdef(merged))
    base_logits = _logits(initial.frozen, tokens, graphdef=_base_graphdef(exp.config))
    assert float(jnp.max(jnp.abs(logits - base_logits))) > 0.1  # the adapters matter
    # Same f32 math, summed in another order (x@(W + AB) vs x@W + (x@A)@B): logits of
    # magnitude ~5 agree to ~1e-6; 1e-5 is ten times that margin.
    np.testing.assert_allclose(merged_logits, logits, atol=1e-5)

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jtrain.interop import hf

    hf.save_model(merged, str(tmp_path), max_position_embeddings=64)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        hf_logits = reloaded(torch.tensor(np.asarray(tokens))).logits.float().numpy()
    np.testing.assert_allclose(hf_logits, merged_logits, atol=2e-4)  # as tests/test_hf.py


def test_int8_base_is_close_to_the_float_base_and_a_third_of_its_kernels(trained, tokens):
    exp, initial, _, _ = trained
    config = lora_config(exp.config.model.init_from)
    config.model.lora.base_dtype = "int8"
    exp8 = Experiment.from_config(config)
    base = pretrained.load(config.model.init_from, exp8.abstract_base)
    frozen8 = exp8.init_state(base=base).frozen[BASE]  # the same base, quantized
    kernels8 = nnx.state(frozen8, int8.Quantized)
    kernels = nnx.state(initial.frozen[BASE], lambda path, _: path[-1] in lora.KERNEL_NAMES)
    assert _nbytes(kernels8) < 0.3 * _nbytes(kernels)  # int8 + one f32 scale per column
    model_params8 = nnx.merge_state(initial.params, frozen8)
    logits = _logits(initial.model_params, tokens, graphdef=exp.graphdef)
    logits8 = _logits(model_params8, tokens, graphdef=exp8.graphdef)
    # Per-channel int8 rounds each weight by at most 1/254 of its column's largest.
    error = float(jnp.max(jnp.abs(logits8 - logits))) / float(jnp.max(jnp.abs(logits)))
    assert 0 < error < 0.02
    merged = lora.merge(nnx.merge(exp8.graphdef, model_params8))
    merged_logits = _logits(nnx.state(merged), tokens, graphdef=nnx.graphdef(merged))
    np.testing.assert_allclose(merged_logits, logits8, atol=1e-5)


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_lora_from_a_trained_run_checkpoints_adapters_only_and_resumes_exactly(
    base_run, trained, tmp_path
):
    base_workdir, base_results = base_run
    _, _, _, losses = trained
    workdir = str(tmp_path / "lora")
    run.train_and_evaluate(lora_config(base_workdir, train__steps=STEPS // 2), workdir)
    # The base came from the trained run: with zero-init B, step 0 validates as it ended.
    step0 = [e for e in read_metrics(os.path.join(workdir, "metrics.jsonl")) if e["step"] == 0]
    assert step0[0]["loss"] == base_results["val"]["loss"]
    lora_bytes = _dir_bytes(os.path.join(workdir, "checkpoints", str(STEPS // 2)))
    full_bytes = _dir_bytes(os.path.join(base_workdir, "checkpoints", "3"))
    print(f"checkpoint: LoRA {lora_bytes:,} bytes, full {full_bytes:,} bytes")
    assert lora_bytes < full_bytes / 3  # mostly Orbax's fixed overhead at this size

    # Resumed at STEPS // 2, the base rebuilt from init_from: the losses of an uninterrupted
    # run (the fixture's, stepped directly on the same batches), bit for bit.
    run.train_and_evaluate(lora_config(base_workdir), workdir)
    resumed = train_losses(workdir)
    assert [resumed[step] for step in range(1, STEPS + 1)] == losses
