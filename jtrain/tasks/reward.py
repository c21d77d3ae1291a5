"""Reward models: the decoder trunk with a scalar head, trained so chosen outranks rejected.

Keys (`config.reward.*`; a config without the block takes these defaults):
  center_coefficient: 0.0   adds c * (r_chosen + r_rejected)^2, keeping rewards near zero

The loss is Bradley-Terry's, -log sigmoid(r_chosen - r_rejected - margin), with each record's
optional `margin` (TRL's RewardTrainer). A sequence's reward is the head's output at its last
real token, found from the sequence's length, never from the PAD id: the same token whatever
the padding side, and right even when PAD equals EOS and the sequence ends with EOS.
Metrics: `accuracy` (the fraction of pairs with r_chosen > r_rejected) and `margin` (the mean
of r_chosen - r_rejected). Data as for DPO (`jtrain.tasks.preference_examples`); the model
starts from an LM run or hf:PATH through `model.init_from` (the head starts fresh), and
`jtrain.export` writes it as a Hugging Face `...ForSequenceClassification` with one label.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtrain import models, sampler, tasks
from jtrain.models.transformer import TransformerConfig
from jtrain.tasks import preference_examples, rewards
from jtrain.tasks.base import Batch, LossOutput, Task, section
from jtrain.tasks.dpo import DPOTask
from jtrain.tasks.pair_logps import pair_rows
from jtrain.validation import require

_DEFAULTS = {"center_coefficient": 0.0}


def settings(config) -> dict:
    return section(config, "reward", _DEFAULTS)


def last_token_scores(scores_BxLx1: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """The score at each row's last real token (row b's token lengths_b - 1), [B]."""
    last = jnp.clip(lengths_B - 1, 0, scores_BxLx1.shape[1] - 1)
    return jnp.take_along_axis(scores_BxLx1[..., 0], last[:, None], axis=1)[:, 0]


def sequence_rewards(model, tokens_BxL: jax.Array, lengths_B: jax.Array, **options) -> jax.Array:
    """A reward model's score of each (right-padded) sequence, [B] float32."""
    return last_token_scores(model(tokens_BxL, **options), lengths_B)


@tasks.register("reward")
class RewardTask(DPOTask):
    """Batch keys: tokens, completion [B, 2, L], lengths [B, 2], margin, loss_weight [B]."""

    name = "reward"

    @classmethod
    def validate(cls, config) -> None:
        c = settings(config)["center_coefficient"]
        require(c >= 0, "reward.center_coefficient", c, "must be >= 0")
        cls.validate_data(config)

    def examples(self, spec, split: str):
        data = self.config.data
        length = self.config.train.seq_len  # the whole sequence is read; nothing is predicted
        return preference_examples.load_pairs(
            spec, split, data.tokenizer, data.chat_template, length
        )

    def make_model(self, rngs: nnx.Rngs) -> nnx.Module:
        family = models.family_of(self.config.model)
        return family.make(self.config.model, head="scores", rngs=rngs, outputs=1)

    def frozen_models(self):
        return {}

    def loss(self, model, batch: Batch, *, dropout_rng=None, frozen=None) -> LossOutput:
        tokens, lengths = pair_rows(batch, "tokens"), pair_rows(batch, "lengths")
        rewards = sequence_rewards(model, tokens, lengths, dropout_rng=dropout_rng)
        chosen, rejected = rewards[0::2], rewards[1::2]
        margin = chosen - rejected
        losses = -jax.nn.log_sigmoid(margin - batch["margin"])
        c = settings(self.config)["center_coefficient"]
        losses = losses + c * jnp.square(chosen + rejected)
        weight = batch["loss_weight"].astype(jnp.float32)
        metrics = {"accuracy": (chosen > rejected).astype(jnp.float32), "margin": margin}
        return LossOutput(
            loss_sum=jnp.sum(losses * weight),
            weight=jnp.sum(weight),
            sums={name: jnp.sum(value * weight) for name, value in metrics.items()},
        )

    def report(self, totals: LossOutput) -> dict[str, float]:
        return Task.report(self, totals)

    def flops_per_example(self, *, weight_grads: bool = True) -> float:
        seq_len = self.config.train.seq_len
        per_token = TransformerConfig.from_mapping(self.config.model).flops_per_token(
            seq_len, weight_grads=weight_grads, head_outputs=1
        )
        return 2 * seq_len * per_token  # both sequences, forward and backward

    def generation_set(self, split: str, limit: int):
        return None  # a reward model scores; it does not generate

    def show(self, model: nnx.Module) -> None:
        """Nothing to sample: a reward model's output is its evaluation metrics."""


class TrainedRewardModel:
    """A finished reward run as a GRPO reward: scores (prompt, completion) pairs, loaded on
    first use. Each pair is tokenized as the run's training pairs were (its tokenizer and
    chat template; a text completion gets EOS) and cut to the run's train.seq_len."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._loaded = None

    def _load(self):
        from jtrain import runs  # runs builds Experiments, which import the tasks

        config = runs.run_config(self.workdir)
        if config.task != "reward":
            raise ValueError(
                f"reward_model:{self.workdir} is a task={config.task!r} run; name a task=reward "
                "run's workdir."
            )
        model = runs.trained_model(self.workdir)
        encoder = preference_examples.Encoder(config.data.tokenizer, config.data.chat_template)
        graphdef, state = nnx.split(model)

        def score(state, tokens, lengths):
            return sequence_rewards(nnx.merge(graphdef, state), tokens, lengths)

        self._loaded = (jax.jit(score), state, encoder, int(config.train.seq_len))
        return self._loaded

    def __call__(self, prompts, completions, **fields) -> list[float]:
        score, state, encoder, seq_len = self._loaded or self._load()
        rows = []
        for prompt, completion in zip(prompts, completions, strict=True):
            answer = (
                completion
                if isinstance(prompt, str)
                else [{"role": "assistant", "content": completion}]
            )
            ids, chosen, _ = encoder(preference_examples.Pair(prompt, answer, answer))
            rows.append(np.concatenate([ids, chosen])[:seq_len])
        width = sampler.length_bucket(max(r.size for r in rows))
        tokens = np.full((len(rows), width), encoder.tokenizer.pad_id, np.int32)
        for i, row in enumerate(rows):
            tokens[i, : row.size] = row
        lengths = np.array([r.size for r in rows], np.int32)
        return [float(s) for s in np.asarray(score(state, tokens, lengths))]


@rewards.register(rewards.REWARD_MODEL, argument=True)
def reward_model(workdir: str):
    """`reward_model:WORKDIR` in grpo.rewards: a trained jtrain reward model's score."""
    scorer = TrainedRewardModel(workdir)

    def reward(prompts, completions, **fields):
        return scorer(prompts, completions)

    reward.__name__ = "reward_model"
    return reward
