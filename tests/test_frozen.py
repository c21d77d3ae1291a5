"""Frozen parts (a teacher here; a DPO reference, a LoRA base alike): loaded from their own
spec, passed through the step without a copy, never checkpointed, rebuilt on resume. And a
second head on the same trunk."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtrain import checkpoint, checkpoint_layout, models, pretrained, run, tasks
from jtrain.experiment import Experiment
from jtrain.models.transformer import Decoder
from jtrain.state import BASE
from jtrain.tasks.lm import LMTask, token_cross_entropy
from tests.conftest import tiny_config, train_losses


class DistilledLM(LMTask):
    """The LM loss plus the squared distance of the logits to a frozen teacher's."""

    def __init__(self, config, teacher_from: str):
        super().__init__(config)
        self.teacher_from = teacher_from

    def frozen_models(self):
        make = LMTask(self.config).make_model  # the teacher has the student's architecture
        return {"teacher": tasks.FrozenModel(make=make, init_from=self.teacher_from)}

    def loss(self, model, batch, *, dropout_rng=None, frozen=None):
        logits = model(batch["inputs"], dropout_rng=dropout_rng)
        teacher = frozen["teacher"](batch["inputs"])
        weight = batch["loss_weight"]
        nll = token_cross_entropy(logits, batch["targets"])
        distance = jnp.mean((logits - teacher) ** 2, axis=-1)
        return tasks.LossOutput(
            loss_sum=jnp.sum((nll + distance) * weight),
            weight=jnp.sum(weight),
            sums={"distance": jnp.sum(distance * weight)},
        )


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    run.train_and_evaluate(tiny_config(train__steps=6, checkpoint__every_steps=0), workdir)
    return workdir


def _student_config(**overrides):
    return tiny_config(train__steps=8, train__log_every=1, checkpoint__every_steps=4, **overrides)


def test_a_frozen_model_loads_from_its_own_spec_and_is_aliased_through_the_step(teacher):
    config = _student_config()
    exp = Experiment.from_config(config, task=DistilledLM(config, teacher))
    state = exp.init_state()
    expected = pretrained.load(teacher, exp.abstract_sources["teacher"])
    for a, b in zip(
        jax.tree.leaves(expected), jax.tree.leaves(state.frozen["teacher"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert not jax.tree.leaves(state.frozen[BASE])  # every student weight trains
    batch = {
        "inputs": np.ones((16, 32), np.int32),
        "targets": np.ones((16, 32), np.int32),
        "loss_weight": np.ones((16, 32), np.float32),
    }
    compiled = exp.train_step.lower(state, exp.global_batch(batch)).compile()
    aliased = compiled.memory_analysis().alias_size_in_bytes
    assert aliased >= _nbytes(state.frozen) + _nbytes(state.params)  # no copy of the teacher


def test_frozen_models_are_never_checkpointed_and_are_rebuilt_on_resume(teacher, tmp_path):
    config = _student_config()
    straight = str(tmp_path / "straight")
    run.train_and_evaluate(config, straight, task=DistilledLM(config, teacher))
    ckpts = checkpoint.Checkpoints(straight, config.checkpoint)
    layout = checkpoint_layout.saved_layout(ckpts.manager, 8)["layout"]
    ckpts.close()
    assert not [e["name"] for e in layout["leaves"] if e["name"].startswith("frozen")]
    # Lose the last checkpoint and run the same command again: it resumes at step 4, loads
    # the teacher again from its spec, and reproduces every loss exactly.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    run.train_and_evaluate(config, resumed, task=DistilledLM(config, teacher))
    assert train_losses(resumed) == train_losses(straight)


def test_a_scores_head_sits_on_the_language_models_trunk(teacher):
    config = tiny_config()
    family = models.family_of(config.model)
    lm = family.make(config.model, head="logits", rngs=nnx.Rngs(0))
    scorer = family.make(config.model, head="scores", outputs=3, rngs=nnx.Rngs(1))
    trunk = nnx.eval_shape(lambda: Decoder(lm.cfg, rngs=nnx.Rngs(0)))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        nnx.state(trunk, nnx.Param),
    )
    weights = pretrained.load(teacher, abstract)  # an LM run's trunk, without its head
    nnx.update(lm, weights)
    nnx.update(scorer, weights)
    tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16)
    hidden = lm.hidden(tokens)
    np.testing.assert_allclose(lm(tokens), hidden @ lm.embed_VxD[...].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scorer(tokens), hidden @ scorer.score_DxO[...], rtol=1e-5, atol=1e-6)
    assert scorer(tokens).shape == (2, 16, 3)
