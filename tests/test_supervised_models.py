"""The supervised model families (mlp, cnn, vit): shapes, dropout, no cross-example statistics,
gradients, config validation, logical axes and forward FLOPs.

Each family's numbers come from one jitted probe, and keys use the "rbg" PRNG: XLA:CPU takes
seconds to compile every program that draws threefry random numbers.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jtrain import mesh as mesh_lib
from jtrain import models
from jtrain.models.inputs import InputSpec
from jtrain.validation import ConfigError
from tests.conftest import tiny_config

OUTPUTS = 3
DIGITS = InputSpec(image_shape=(8, 8, 1))
TABLE = InputSpec(numeric=3, categories=(4, 6))
CASES = {
    "mlp": ({"width": 16, "depth": 2, "embed_dim": 4, "dropout": 0.5}, TABLE),
    "cnn": ({"channels": 4, "stages": 3, "blocks": 1, "dropout": 0.5}, DIGITS),
    "vit": (
        {"image_size": 8, "patch_size": 4, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32}
        | {"dropout": 0.5},
        DIGITS,
    ),
}
KINDS = tuple(CASES)


def key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


def build(kind: str, spec: InputSpec | None = None, **overrides) -> nnx.Module:
    options, default_spec = CASES[kind]
    model_config = {"kind": kind, **options, **overrides}
    family = models.get(kind)
    return family.make(
        model_config,
        head="scores",
        rngs=nnx.Rngs(key(0)),
        outputs=OUTPUTS,
        inputs=spec or default_spec,
    )


def batch(spec: InputSpec, size: int = 4, seed: int = 1) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    out = {}
    if spec.numeric:
        out["numeric"] = rng.normal(size=(size, spec.numeric)).astype(np.float32)
    if spec.categories:
        ids = [rng.integers(0, n, size) for n in spec.categories]
        out["categorical"] = np.stack(ids, axis=1).astype(np.int32)
    if spec.image_shape:
        out["image"] = rng.uniform(size=(size, *spec.image_shape)).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in out.items()}


def last_feature_changed(inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch with its last numeric column or its last (bottom-right) image patch changed."""
    out = dict(inputs)
    if "numeric" in out:
        out["numeric"] = out["numeric"].at[:, -1].add(1.0)
    if "image" in out:
        out["image"] = out["image"].at[:, 4:, 4:, :].set(0.0)
    return out


@nnx.jit
def _probe(model, inputs, rng):
    """Everything the per-family tests check, in one compiled program (compiling is slow)."""

    def loss(m):
        dropped = m(inputs, dropout_rng=rng)
        return jnp.sum(dropped**2), dropped

    (_, dropped), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    graph, state = nnx.split(model)
    # lax.map scores the two halves one after the other, as two micro-batches would be.
    halves = {k: v.reshape(2, -1, *v.shape[1:]) for k, v in inputs.items()}
    by_half = jax.lax.map(lambda half: nnx.merge(graph, state)(half), halves)
    return {
        "plain": model(inputs),
        "again": model(inputs, dropout_rng=None),
        "dropped": dropped,
        "halves": by_half.reshape(-1, OUTPUTS),
        "changed": model(last_feature_changed(inputs)),
        "grads": jax.tree.leaves(grads),
    }


@pytest.fixture(scope="module", params=KINDS)
def probed(request):
    kind = request.param
    model = nnx.jit(lambda: build(kind))()
    return kind, jax.device_get(_probe(model, batch(CASES[kind][1]), key(2)))


def test_outputs_are_float32_scores_and_deterministic_without_rng(probed):
    _, out = probed
    assert out["plain"].shape == (4, OUTPUTS) and out["plain"].dtype == np.float32
    np.testing.assert_array_equal(out["plain"], out["again"])


def test_dropout_applies_only_with_an_rng(probed):
    _, out = probed
    assert not np.allclose(out["plain"], out["dropped"])


def test_each_example_is_scored_alone(probed):
    # No batch statistics: the loss is the same however a batch is split over devices.
    _, out = probed
    np.testing.assert_allclose(out["halves"], out["plain"], atol=1e-6, rtol=0)


def test_every_score_depends_on_the_last_feature(probed):
    # For the ViT this is the check that attention is not causal: with pooling=cls the class
    # token comes first and, under a causal mask, would never see the last patch.
    _, out = probed
    assert (np.abs(out["changed"] - out["plain"]) > 1e-7).all()


def test_gradients_are_finite_and_reach_the_parameters(probed):
    _, out = probed
    assert all(np.isfinite(g).all() for g in out["grads"])
    assert sum(float(np.abs(g).sum()) for g in out["grads"]) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_params_carry_logical_axes_the_mesh_rules_know(kind):
    model = nnx.eval_shape(lambda: build(kind))
    params = nnx.state(model, nnx.Param)
    for path, param in nnx.to_flat_state(params):
        axes = param.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == param.get_value().ndim, (path, axes)
    # The default rules cover every name: a 2x2x2 mesh derives a sharding for each parameter.
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = mesh_lib.parse_rules(tiny_config().mesh.rules)
    mesh_lib.tree_shardings(params, mesh, rules)


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_scores_head_is_offered(kind):
    with pytest.raises(ConfigError, match=f"model.kind={kind} has only a scores head"):
        models.get(kind).make({}, head="logits", rngs=nnx.Rngs(0), outputs=2, inputs=DIGITS)


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_validate(kind):
    models.get(kind).validate(ml_collections.ConfigDict({"model": {"kind": kind}}))


@pytest.mark.parametrize(
    "kind, overrides, key_name",
    [
        ("mlp", {"activation": "tanh"}, "model.activation"),
        ("mlp", {"depth": -1}, "model.depth"),
        ("mlp", {"linear_skip": "yes"}, "model.linear_skip"),
        ("mlp", {"dropout": 1.0}, "model.dropout"),
        ("cnn", {"norm": "batch"}, "model.norm"),
        ("cnn", {"channels": 0}, "model.channels"),
        ("cnn", {"dtype": "float16"}, "model.dtype"),
        ("vit", {"image_size": 32, "patch_size": 5}, "model.patch_size"),
        ("vit", {"d_model": 16, "n_heads": 3}, "model.n_heads"),
        ("vit", {"pooling": "max"}, "model.pooling"),
    ],
)
def test_validate_names_the_bad_key(kind, overrides, key_name):
    config = ml_collections.ConfigDict({"model": {"kind": kind, **overrides}})
    with pytest.raises(ConfigError, match=f"config.{key_name}="):
        models.get(kind).validate(config)


def test_image_models_need_images_and_patches_that_fit():
    with pytest.raises(ConfigError, match="model.kind='cnn'.*needs image inputs"):
        build("cnn", TABLE)
    with pytest.raises(ConfigError, match="model.patch_size=3.*8x8"):
        build("vit", DIGITS, patch_size=3)


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("cnn", {"norm": "layer"}),
        ("cnn", {"norm": "none", "dtype": "bfloat16"}),
        ("vit", {"pooling": "mean", "dtype": "bfloat16"}),
        ("mlp", {"depth": 0}),
        ("mlp", {"norm": "none", "dtype": "bfloat16"}),
    ],
)
def test_models_fit_any_image_shape_and_return_float32(kind, overrides):
    model = nnx.eval_shape(lambda: build(kind, InputSpec(image_shape=(8, 12, 3)), **overrides))
    images = jax.ShapeDtypeStruct((2, 8, 12, 3), jnp.float32)
    scores = nnx.eval_shape(lambda m, x: m({"image": x}), model, images)
    assert scores.shape == (2, OUTPUTS) and scores.dtype == jnp.float32


def test_mlp_reads_only_categorical_or_only_numeric_columns():
    for spec in (InputSpec(categories=(3, 5)), InputSpec(numeric=4)):
        out = jax.jit(lambda b, s=spec: build("mlp", s)(b))(batch(spec))
        assert out.shape == (4, OUTPUTS) and np.isfinite(out).all()


def test_mlp_forward_flops_count_every_dense_layer():
    mlp = models.get("mlp")
    config = {"width": 10, "depth": 1, "embed_dim": 4}
    features = 3 + 2 * 4  # TABLE: 3 numeric columns, 2 categorical ones embedded in 4 each
    with_skip = 2 * (features * 10 + 10 * OUTPUTS + features * OUTPUTS)
    assert mlp.forward_flops(config, TABLE, OUTPUTS) == with_skip
    no_skip = mlp.forward_flops({**config, "linear_skip": False}, TABLE, OUTPUTS)
    assert no_skip == 2 * (features * 10 + 10 * OUTPUTS)
    assert mlp.forward_flops({"depth": 0}, TABLE, OUTPUTS) == 2 * (3 + 2 * 8) * OUTPUTS


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_image_forward_flops_are_about_two_per_weight_use(kind):
    options, spec = CASES[kind]
    flops = models.get(kind).forward_flops(options, spec, OUTPUTS)
    if kind == "vit":
        # Every weight once per token (5: four patches and the class token), plus attention.
        params = nnx.state(nnx.eval_shape(lambda: build(kind)), nnx.Param)
        weights = sum(p.get_value().size for _, p in nnx.to_flat_state(params))
        assert 0.8 < flops / (2 * weights * 5) < 1.5
    else:
        # The stem alone: 8x8 positions, a 3x3x1 window, 4 output channels.
        assert flops > 2 * 64 * 9 * 4
