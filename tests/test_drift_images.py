"""Drift of images: a tiny image classifier's profile holds per-image channel statistics and
its predictions; darkened images drift in their channel means, fresh images of the same kind
do not; and the CNN's penultimate features are what its head reads."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import supervised as recipes
from jtrain import models
from jtrain.drift import build, profile, supervised_profiler
from jtrain.models.inputs import InputSpec
from jtrain.run import train_and_evaluate

COLOURS = {"red": (200, 40, 40), "blue": (40, 40, 200)}


def _images(directory, count: int, seed: int, scale: float = 1.0, classes: bool = True) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        folder = directory / name if classes else directory
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip((np.array(colour) + rng.normal(0, 30, (8, 8, 3))) * scale, 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}{i}.png")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("images")
    for split, count in (("train", 100), ("val", 5), ("test", 5)):
        _images(data / split, count, seed=len(split) * 7 + count)
    model = {
        "kind": "mlp",
        "width": 16,
        "depth": 1,
        "dropout": 0.0,
        "embed_dim": 4,
        "image_size": 8,
    }
    config = recipes.base("classify", f"images:{data}", model)
    config.train.epochs, config.train.batch_size, config.train.log_every = 1, 16, 1000
    workdir = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(config, workdir)
    build.write_profile_of_run(workdir)  # as `python -m jtrain.drift --write_profile` does
    return workdir


def test_the_profile_holds_channel_statistics_and_predictions(image_run):
    content, sample = profile.load(image_run)
    names = {c["name"] for c in content["columns"]}
    assert {"red_mean", "green_std", "blue_mean", "predicted_class", "confidence"} <= names
    assert content["rows"] == 200 and len(sample.columns["red_mean"].values) == 200


def test_darker_images_drift_and_fresh_ones_do_not(image_run, tmp_path):
    _images(tmp_path / "fresh", 40, seed=1, classes=False)
    _images(tmp_path / "dark", 40, seed=2, scale=0.7, classes=False)
    fresh, _, _ = build.drift_report(image_run, f"images:{tmp_path / 'fresh'}", permutations=10)
    assert not fresh["drift"], fresh["verdict"]
    dark, _, _ = build.drift_report(image_run, f"images:{tmp_path / 'dark'}", permutations=10)
    assert {"red_mean", "blue_mean"} <= set(dark["drifting_features"])


def test_a_table_source_for_an_image_run_is_an_error(image_run):
    with pytest.raises(profile.ProfileError, match="reads images; give images:DIR"):
        build.drift_report(image_run, "csv:new.csv")


def test_cnn_features_are_what_its_head_reads():
    config = {
        "kind": "cnn",
        "channels": 4,
        "stages": 1,
        "blocks": 1,
        "norm": "group",
        "dropout": 0.0,
        "image_size": 8,
        "dtype": "float32",
    }
    family = models.family_of(config)
    spec = InputSpec(numeric=0, categories=(), image_shape=(8, 8, 3))
    model = family.make(config, head="scores", rngs=nnx.Rngs(0), outputs=3, inputs=spec)
    inputs = {"image": jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))}
    features = model.features(inputs)
    assert features.shape == (2, 4)
    expected = features @ model.head[...] + model.head_bias.bias[...]
    np.testing.assert_allclose(model(inputs), expected, rtol=1e-5, atol=1e-6)
    profiled = supervised_profiler._penultimate(model, {"image": np.asarray(inputs["image"])})
    np.testing.assert_allclose(profiled, features, rtol=1e-5, atol=1e-6)  # batched and padded
