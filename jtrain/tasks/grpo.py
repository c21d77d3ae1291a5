"""GRPO: reinforcement learning from rewards of the policy's own completions.

The driver is the ordinary loop and compiled step; only the batches differ: they are rollouts
(`jtrain.tasks.rollouts`) sampled with the KV-cache sampler from the current weights. The loss
is TRL's clipped surrogate (`jtrain.tasks.grpo_losses`) on the completion tokens, with
group-relative advantages and an optional k3 KL penalty against a frozen reference.

Keys (`config.grpo.*`; a config without the block takes these defaults):
  rewards: "exact_match"       weighted reward functions (`jtrain.tasks.rewards` syntax)
  num_generations: 8           completions per prompt; must divide train.batch_size
  max_completion_length: 32    new tokens per completion
  temperature: 1.0, top_k: 0, top_p: 1.0   sampling (the loss divides logits by temperature)
  scale_rewards: "group"       group | batch | none: what the advantage is divided by
  loss: "dapo"                 dapo | grpo | dr_grpo (how token losses are averaged)
  epsilon: 0.2, epsilon_high: 0.2   the clip range of the ratio: [1 - eps, 1 + eps_high]
  iterations: 1                optimizer steps per rollout batch (old log-probs kept)
  beta: 0.0                    the KL penalty's weight; > 0 builds the reference
  reference: ""                the KL reference: "" = the starting weights, a workdir or
                               hf:PATH; a LoRA run's is its base with the adapters off
  mask_truncated: False        completions cut at max_completion_length get no loss
  dynamic_sampling: False      drop groups whose rewards are all equal, refill with new prompts
  dynamic_sampling_rounds: 4   sampling rounds per batch at most

Validation and test events hold the rewards of greedy completions of the split's prompts
(`reward`, `rewards/<name>/mean`), not a loss: there is no loss without rollouts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtrain import console, tasks
from jtrain.data import tokenizers
from jtrain.models import lm_head, lora
from jtrain.models.transformer import TransformerConfig
from jtrain.sampler import Completion, Sampler
from jtrain.tasks import grpo_losses, grpo_prompts, rewards, rollouts
from jtrain.tasks.base import Batch, FrozenModel, LossOutput, section
from jtrain.tasks.lm import LMTask, token_cross_entropy
from jtrain.validation import ConfigError, one_of, require

REFERENCE = "reference"
_DEFAULTS = {
    "rewards": "exact_match",
    "num_generations": 8,
    "max_completion_length": 32,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "scale_rewards": "group",
    "loss": "dapo",
    "epsilon": 0.2,
    "epsilon_high": 0.2,
    "iterations": 1,
    "beta": 0.0,
    "reference": "",
    "mask_truncated": False,
    "dynamic_sampling": False,
    "dynamic_sampling_rounds": 4,
}


def settings(config) -> dict:
    return section(config, "grpo", _DEFAULTS)


def token_logps(model, batch: Batch, temperature: float, *, dropout_rng=None):
    """(log p of each target under logits / temperature, the per-token entropy), [B, L]."""

    def logps_and_entropy(logits, targets):
        logits = logits / temperature
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
        return -token_cross_entropy(logits, targets), entropy

    inputs, targets = batch["inputs"], batch["targets"]
    return lm_head.per_token(model, inputs, targets, logps_and_entropy, dropout_rng=dropout_rng)


@tasks.register("grpo")
class GRPOTask(LMTask):
    """Batch keys: inputs, targets, completion, old_logps [B, L]; advantages, loss_weight [B]."""

    name = "grpo"
    selection_metric = ("reward", "max")

    @classmethod
    def validate(cls, config) -> None:
        s = settings(config)
        one_of("grpo.loss", s["loss"], grpo_losses.LOSSES)
        one_of("grpo.scale_rewards", s["scale_rewards"], grpo_losses.SCALES)
        g = s["num_generations"]
        require(g >= 2, "grpo.num_generations", g, "must be >= 2 (advantages compare a group)")
        require(
            config.train.batch_size % g == 0,
            "train.batch_size",
            config.train.batch_size,
            f"must be a multiple of grpo.num_generations={g} (whole groups per batch)",
        )
        room = config.train.seq_len
        n = s["max_completion_length"]
        require(0 < n < room, "grpo.max_completion_length", n, f"must be in [1, {room})")
        require(s["temperature"] > 0, "grpo.temperature", s["temperature"], "must be > 0")
        require(0 < s["top_p"] <= 1, "grpo.top_p", s["top_p"], "must be in (0, 1]")
        require(s["top_k"] >= 0, "grpo.top_k", s["top_k"], "must be >= 0 (0 = all)")
        require(s["epsilon"] > 0, "grpo.epsilon", s["epsilon"], "must be > 0")
        require(s["epsilon_high"] > 0, "grpo.epsilon_high", s["epsilon_high"], "must be > 0")
        require(s["iterations"] >= 1, "grpo.iterations", s["iterations"], "must be >= 1")
        require(s["beta"] >= 0, "grpo.beta", s["beta"], "must be >= 0")
        rounds = s["dynamic_sampling_rounds"]
        require(rounds >= 1, "grpo.dynamic_sampling_rounds", rounds, "must be >= 1")
        epochs = config.train.get("epochs", 0)
        require(not epochs, "train.epochs", epochs, "must be 0 with task=grpo: set train.steps")
        rewards.parse(s["rewards"])  # ConfigError naming a bad entry
        lora_run = lora.LoRAConfig.from_config(config.model).rank > 0
        if s["beta"] and not (s["reference"] or config.model.init_from or lora_run):
            raise ConfigError(
                "grpo.beta > 0 needs a KL reference: set --config.model.init_from (the starting "
                "weights are the reference) or --config.grpo.reference."
            )
        super().validate(config)  # the LM's vocabulary check; the pipeline checks data.source

    def __init__(self, config):
        super().__init__(config)
        self._sampler: Sampler | None = None  # one: its compiled buckets serve every rollout
        self._gap = None  # the compiled log-prob check

    @functools.cached_property
    def settings(self) -> dict:
        return settings(self.config)

    @functools.cached_property
    def rewards(self) -> list[rewards.Reward]:
        return rewards.parse(self.settings["rewards"])

    @functools.cached_property
    def tokenizer(self):
        return tokenizers.get_tokenizer(self.config.data.tokenizer)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_id)

    def source_specs(self, source: str):
        return grpo_prompts.parse_spec(source)

    def prompts(self, split: str) -> tuple[grpo_prompts.Prompt, ...]:
        data = self.config.data
        longest = self.config.train.seq_len + 1 - self.settings["max_completion_length"]
        specs = self.source_specs(data.source)
        return grpo_prompts.load_prompts(specs, split, data.tokenizer, data.chat_template, longest)

    @functools.cached_property
    def stop_ids(self) -> tuple[int, ...]:
        data = self.config.data
        return grpo_prompts.stop_ids(data.tokenizer, data.chat_template, self.prompts("train"))

    def examples(self, spec, split: str):
        raise NotImplementedError("task=grpo trains on rollouts, not on a split's examples")

    # Frozen reference and the policy.

    def _reference_is_base(self) -> bool:
        lora_run = lora.LoRAConfig.from_config(self.config.model).rank > 0
        return lora_run and not self.settings["reference"]

    def frozen_models(self):
        if not self.settings["beta"] or self._reference_is_base():
            return {}
        return {REFERENCE: FrozenModel(self.make_model, init_from=self.settings["reference"])}

    def policy(self, exp, state) -> nnx.Module:
        """The model with the state's current weights (adapters applied)."""
        model, _ = exp.structure.models(state.params, state.frozen)
        return model

    # Sampling, for the rollouts and evaluation.

    def sample(self, model, prompts, per_prompt: int, *, seed: int, greedy=False):
        """`per_prompt` completions of each prompt (adjacent), from the model's weights."""
        if self._sampler is None:
            self._sampler = Sampler(model)
        self._sampler.state = nnx.state(model)
        s = self.settings
        return self._sampler.generate(
            [p.ids for p in prompts for _ in range(per_prompt)],
            max_new_tokens=s["max_completion_length"],
            stop_ids=self.stop_ids,
            temperature=0.0 if greedy else s["temperature"],
            top_k=s["top_k"],
            top_p=s["top_p"],
            seed=seed,
        )

    def completion_text(self, completion: Completion) -> str:
        stopped = completion.finish_reason == "stop"
        return self.tokenizer.decode(completion.tokens[:-1] if stopped else completion.tokens)

    def batch_source(self, exp, workdir: str):
        s = self.settings
        fields = {f.name for f in rollouts.Settings.__dataclass_fields__.values()}
        prompts = self.prompts("train")
        if not prompts:
            raise ValueError(f"data.source={self.config.data.source!r} has no train prompts")
        return rollouts.Rollouts(
            exp, self, prompts, rollouts.Settings(**{k: s[k] for k in fields}), workdir
        )

    # The loss.

    def loss(self, model, batch: Batch, *, dropout_rng=None, frozen=None) -> LossOutput:
        s = self.settings
        logps, entropy = token_logps(model, batch, s["temperature"], dropout_rng=dropout_rng)
        ref = None
        if s["beta"]:
            reference = lora.adapters_off(model) if self._reference_is_base() else frozen[REFERENCE]
            ref = jax.lax.stop_gradient(token_logps(reference, batch, s["temperature"])[0])
        terms = grpo_losses.policy_loss(
            s["loss"],
            logps,
            batch["old_logps"],
            ref,
            batch["advantages"],
            batch["completion"],
            epsilon=s["epsilon"],
            epsilon_high=s["epsilon_high"],
            beta=s["beta"],
            max_completion_length=s["max_completion_length"],
            row_weight=batch["loss_weight"],
            entropy=jax.lax.stop_gradient(entropy),
        )
        return LossOutput(terms.loss_sum, terms.weight, terms.sums)

    def report(self, totals: LossOutput) -> dict[str, float]:
        weight = max(float(totals.weight), 1e-9)
        metrics = {"loss": float(totals.loss_sum) / weight}
        metrics.update(grpo_losses.report(totals.sums))
        return metrics

    def _logprob_gap(self, params, frozen, batch, *, structure):
        model, _ = structure.models(params, frozen)
        logps, _ = token_logps(model, batch, self.settings["temperature"])
        return jnp.max(jnp.abs(logps - batch["old_logps"]) * batch["completion"])

    def logprob_gap(self, exp, state, batch: dict[str, np.ndarray]) -> float:
        """The largest |trainer log-prob - sampler log-prob| over the batch's completion
        tokens: ~0 when the sampler samples exactly the distribution the loss reads."""
        if self._gap is None:
            self._gap = jax.jit(functools.partial(self._logprob_gap, structure=exp.structure))
        return float(self._gap(state.params, state.frozen, exp.global_batch(batch)))

    # Evaluation: rewards of greedy completions.

    def evaluate(self, exp, state, split: str) -> dict[str, float] | None:
        prompts = self.prompts(split)
        if not prompts:
            raise ValueError(f"data.source={self.config.data.source!r} has no {split} prompts")
        limit = int(self.config.eval.generate.examples) or len(prompts)
        prompts = list(prompts[:limit])
        completions = self.sample(self.policy(exp, state), prompts, 1, seed=0, greedy=True)
        texts = [self.completion_text(c) for c in completions]
        fields = rollouts._fields(prompts, 1)
        total, per = rewards.score(self.rewards, [p.prompt for p in prompts], texts, fields)
        metrics = {"reward": float(total.mean()), "examples": float(len(prompts))}
        metrics.update(rewards.metrics(total, per))
        lengths = [c.tokens.size for c in completions]
        metrics["completions/mean_length"] = float(np.mean(lengths))
        return metrics

    # Accounting.

    def batch_shapes(self) -> None:
        return None  # not the language model's token rows: only the data pipeline knows

    def flops_per_example(self, *, weight_grads: bool = True) -> float:
        seq_len = self.config.train.seq_len
        cfg = TransformerConfig.from_mapping(self.config.model)
        return seq_len * cfg.flops_per_token(seq_len, weight_grads=weight_grads)

    def generation_set(self, split: str, limit: int):
        return None  # evaluation already generates (`evaluate`)

    def show(self, model) -> None:
        """Prints the greedy completion of the first validation prompt."""
        prompts = self.prompts("val")[:1]
        if prompts:
            [completion] = self.sample(model, prompts, 1, seed=0, greedy=True)
            console.status(
                f"sample (greedy): {prompts[0].prompt!r} -> {self.completion_text(completion)!r}"
            )
