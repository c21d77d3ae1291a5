"""Direct preference optimisation and its variants: the policy learns to prefer each pair's
chosen completion over the rejected one, relative to a frozen reference.

Keys (`config.dpo.*`; a config without the block takes these defaults):
  loss: "sigmoid"        sigmoid | ipo | hinge | robust (reference-based, `beta` the strength)
                         | simpo | orpo (reference-free); `jtrain.tasks.dpo_losses`
  beta: 0.1
  label_smoothing: 0.0   robust: the assumed fraction of flipped labels, in [0, 0.5)
  gamma: 0.0             simpo: the target reward margin
  sft_weight: 0.0        adds sft_weight * (the chosen completion's mean token NLL): RPO
  reference: ""          "" = the starting weights (`model.init_from`), frozen and never
                         checkpointed; a jtrain workdir or hf:PATH; "none" for simpo / orpo.
                         In a LoRA run the default reference is the base with the adapters
                         off: no second copy of the weights.

Each batch row is a pair (`jtrain.tasks.preference_examples`): both sequences go through the
model in one [2B, L] forward pass, and a sequence's log-probability is the sum over its
completion tokens. The loss and the metrics (TRL's names: rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected) are sums over real pairs,
so they do not depend on the micro-batch or device split. At step 0, with the policy equal to
its reference, the sigmoid loss is ln 2 and rewards/accuracies is 0 (no pair is preferred yet).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jtrain import tasks
from jtrain.data import sources
from jtrain.models import lora
from jtrain.models.transformer import TransformerConfig
from jtrain.tasks import dpo_losses, preference_examples
from jtrain.tasks.base import Batch, FrozenModel, GenerationSet, LossOutput, Task, section
from jtrain.tasks.lm import token_cross_entropy
from jtrain.tasks.sft import SFTTask
from jtrain.validation import ConfigError, one_of, require

REFERENCE = "reference"  # the frozen model's name in TrainState.frozen
NO_REFERENCE = "none"
_DEFAULTS = {
    "loss": "sigmoid",
    "beta": 0.1,
    "label_smoothing": 0.0,
    "gamma": 0.0,
    "sft_weight": 0.0,
    "reference": "",
}


def settings(config) -> dict:
    return section(config, "dpo", _DEFAULTS)


def sequence_logps(model, tokens_NxL1, completion_NxL1, *, dropout_rng=None):
    """(sum of log p over each sequence's completion tokens [N], completion tokens [N])."""
    logits = model(tokens_NxL1[:, :-1], dropout_rng=dropout_rng)
    weight = completion_NxL1[:, 1:]
    logps = -token_cross_entropy(logits, tokens_NxL1[:, 1:])
    return jnp.sum(logps * weight, axis=-1), jnp.sum(weight, axis=-1)


def _pairs(batch: Batch, name: str) -> jax.Array:
    """[B, 2, ...] -> [2B, ...]: rows 2i and 2i + 1 are pair i's chosen and rejected."""
    x = batch[name]
    return x.reshape(-1, *x.shape[2:])


@tasks.register("dpo")
class DPOTask(SFTTask):
    """Batch keys: tokens, completion [B, 2, L + 1], lengths [B, 2], margin, loss_weight [B]."""

    name = "dpo"
    model_reads = "tokens"

    @classmethod
    def validate(cls, config) -> None:
        s = settings(config)
        one_of("dpo.loss", s["loss"], dpo_losses.LOSSES)
        require(s["beta"] > 0, "dpo.beta", s["beta"], "must be positive")
        require(
            0 <= s["label_smoothing"] < 0.5,
            "dpo.label_smoothing",
            s["label_smoothing"],
            "must be in [0, 0.5)",
        )
        require(s["sft_weight"] >= 0, "dpo.sft_weight", s["sft_weight"], "must be >= 0")
        if s["loss"] == "orpo" and s["sft_weight"]:
            raise ConfigError(
                f"dpo.sft_weight={s['sft_weight']} is invalid with dpo.loss='orpo', whose loss "
                "already holds the chosen completion's NLL; set it to 0."
            )
        free = s["loss"] in dpo_losses.REFERENCE_FREE
        if s["reference"] == NO_REFERENCE and not free:
            raise ConfigError(
                f"dpo.reference='none' is invalid with dpo.loss={s['loss']!r}, which compares "
                f"the policy with a reference; use a reference-free loss "
                f"({', '.join(dpo_losses.REFERENCE_FREE)}) or name the reference."
            )
        lora_run = lora.LoRAConfig.from_config(config.model).rank > 0
        if not (free or s["reference"] or config.model.init_from or lora_run):
            raise ConfigError(
                "dpo.reference='' (the starting weights) needs model.init_from: set "
                "--config.model.init_from to the SFT run or hf:PATH to start from, or name the "
                "reference with --config.dpo.reference."
            )
        cls.validate_data(config)

    @classmethod
    def validate_data(cls, config) -> None:
        """The checks every preference task shares (the pipeline checks `data.source`)."""
        super(SFTTask, cls).validate(config)  # the LM's: SFT's chat-source checks do not apply

    @property
    def settings(self) -> dict:
        return settings(self.config)

    def source_specs(self, source: str) -> tuple[sources.SourceSpec, ...]:
        return preference_examples.parse_spec(source)

    def examples(self, spec: sources.SourceSpec, split: str):
        data = self.config.data
        length = self.config.train.seq_len + 1  # inputs and targets are the row shifted by one
        return preference_examples.load_pairs(
            spec, split, data.tokenizer, data.chat_template, length
        )

    def _reference_is_base(self) -> bool:
        """A LoRA run's default reference: its own base, adapters off."""
        lora_run = lora.LoRAConfig.from_config(self.config.model).rank > 0
        return lora_run and not self.settings["reference"]

    def _needs_reference(self) -> bool:
        return self.settings["loss"] not in dpo_losses.REFERENCE_FREE

    def frozen_models(self):
        if not self._needs_reference() or self._reference_is_base():
            return {}
        return {REFERENCE: FrozenModel(self.make_model, init_from=self.settings["reference"])}

    def _reference_logps(self, model, frozen, tokens, completion):
        if self._reference_is_base():
            reference = lora.adapters_off(model)
        else:
            reference = frozen[REFERENCE]
        logps, _ = sequence_logps(reference, tokens, completion)
        return jax.lax.stop_gradient(logps)

    def loss(self, model, batch: Batch, *, dropout_rng=None, frozen=None) -> LossOutput:
        s = self.settings
        tokens, completion = _pairs(batch, "tokens"), _pairs(batch, "completion")
        logps, counts = sequence_logps(model, tokens, completion, dropout_rng=dropout_rng)
        ref = None
        if self._needs_reference():
            ref = self._reference_logps(model, frozen, tokens, completion)
        pair = dpo_losses.PairLogps(
            chosen=logps[0::2],
            rejected=logps[1::2],
            chosen_tokens=counts[0::2],
            rejected_tokens=counts[1::2],
            ref_chosen=None if ref is None else ref[0::2],
            ref_rejected=None if ref is None else ref[1::2],
        )
        losses, metrics = dpo_losses.pair_losses(
            s["loss"],
            pair,
            beta=s["beta"],
            label_smoothing=s["label_smoothing"],
            gamma=s["gamma"],
            sft_weight=s["sft_weight"],
        )
        weight = batch["loss_weight"].astype(jnp.float32)
        return LossOutput(
            loss_sum=jnp.sum(losses * weight),
            weight=jnp.sum(weight),
            sums={name: jnp.sum(value * weight) for name, value in metrics.items()},
        )

    def report(self, totals: LossOutput) -> dict[str, float]:
        return Task.report(self, totals)  # sums per pair; a perplexity would mean nothing here

    def flops_per_example(self, *, weight_grads: bool = True) -> float:
        seq_len = self.config.train.seq_len
        per_token = TransformerConfig.from_mapping(self.config.model).flops_per_token(
            seq_len, weight_grads=weight_grads
        )
        # Two sequences trained; the reference's forward pass is a third of a training pass.
        reference = 1 / 3 if self._needs_reference() else 0.0
        return 2 * seq_len * per_token * (1 + reference)

    def tokens_per_example(self) -> int:
        return 2 * self.config.train.seq_len

    def generation_set(self, split: str, limit: int) -> GenerationSet | None:
        """Each pair's prompt, its chosen completion the reference."""
        data = self.config.data
        return preference_examples.generation_set(
            self.source_specs(data.source), split, data.tokenizer, data.chat_template, limit
        )
