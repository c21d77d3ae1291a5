"""The reward task: the score is read at the last real token, the loss is Bradley-Terry's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrain import config as config_lib
from jtrain.experiment import Experiment
from jtrain.tasks import reward
from tests.conftest import tiny_config


def test_the_score_is_read_by_length_not_by_the_pad_id():
    # Row 0 ends with EOS (id 2) and is padded with 2 as well: PAD == EOS. The last real
    # token is still position 3, which a search for the first PAD would miss (position 2).
    scores = jnp.arange(12, dtype=jnp.float32).reshape(2, 6, 1)
    lengths = jnp.array([4, 6])
    np.testing.assert_array_equal(reward.last_token_scores(scores, lengths), [3.0, 11.0])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "pairs.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(40):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            record = {"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}
            if i % 2:
                record["margin"] = 0.5
            f.write(json.dumps(record) + "\n")
    return f"files:{path}"


def test_loss_is_bradley_terry_with_margin_and_centering(pairs):
    config = tiny_config(task="reward", data__source=pairs, train__batch_size=8)
    config.reward = {"center_coefficient": 0.25}
    config_lib.validate(config)
    exp = Experiment.from_config(config, jax.devices()[:1])
    state = exp.init_state()
    [spec] = exp.task.source_specs(config.data.source)
    examples = exp.task.examples(spec, "train")
    batch = examples.rows(np.arange(8))
    assert batch["margin"].any() and not batch["margin"].all()
    out = exp.eval_step(state.params, state.frozen, exp.global_batch(batch))
    model, _ = exp.structure.models(state.params, state.frozen)
    tokens = batch["tokens"].reshape(16, -1)
    lengths = batch["lengths"].reshape(16)
    scores = np.asarray(reward.sequence_rewards(model, tokens, lengths)).reshape(8, 2)
    chosen, rejected = scores[:, 0], scores[:, 1]
    z = chosen - rejected - batch["margin"]
    expected = np.log1p(np.exp(-z)) + 0.25 * (chosen + rejected) ** 2
    np.testing.assert_allclose(float(out.loss_sum) / float(out.weight), expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(out.sums["accuracy"]) / 8, np.mean(chosen > rejected), rtol=1e-6
    )
    np.testing.assert_allclose(float(out.sums["margin"]) / 8, np.mean(chosen - rejected), rtol=1e-5)


def test_a_reward_model_reads_the_whole_sequence(pairs):
    """Rows are train.seq_len long (nothing is predicted): the last token is never cut."""
    config = tiny_config(task="reward", data__source=pairs)
    [spec] = reward.RewardTask(config).source_specs(config.data.source)
    examples = reward.RewardTask(config).examples(spec, "train")
    assert examples.features["tokens"].shape[-1] == config.train.seq_len


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, pairs):
    from jtrain.run import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("reward_run"))
    config = tiny_config(
        task="reward", data__source=pairs, train__steps=1, eval__every_steps=0, train__batch_size=8
    )
    train_and_evaluate(config, workdir)
    return workdir


def test_generate_refuses_a_reward_model(reward_run):
    from jtrain import generate

    with pytest.raises(ValueError, match="Scorer head .* cannot generate"):
        generate.load(reward_run)


def test_a_trained_reward_model_is_a_grpo_reward(reward_run):
    """`reward_model:WORKDIR` scores prompt + completion as the run's pairs were tokenized."""
    from jtrain import runs
    from jtrain.data import tokenizers
    from jtrain.tasks import rewards

    [entry] = rewards.parse(f"reward_model:{reward_run}=2")
    scores = entry.fn(["3+4=", "3+4="], ["7", "8"])
    tok = tokenizers.get_tokenizer("byte")
    model = runs.trained_model(reward_run)
    for completion, score in zip(["7", "8"], scores, strict=True):
        ids = np.concatenate([tok.encode("3+4=" + completion, add_eos=False), [tok.eos_id]])
        expected = reward.sequence_rewards(model, ids[None].astype(np.int32), np.array([ids.size]))
        # The same f32 forward pass batched differently: the rounding of O(1) activations,
        # so an absolute bound too (the score itself may be near 0).
        np.testing.assert_allclose(score, float(expected[0]), rtol=1e-5, atol=1e-6)
    assert entry.weight == 2 and scores[0] != scores[1]
