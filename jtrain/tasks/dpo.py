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
  precompute_reference: False   True: the reference's log-probs of every pair (each split of
                         each source) are computed once before training, in batches, and the
                         reference is then dropped: no reference in memory and no reference
                         pass while training. They are kept in WORKDIR/reference_logps.json
                         under a fingerprint of the pairs and of the reference's weights
                         (spec, checkpoint step or weight files); a resumed run or
                         `--mode=eval` reuses them while it matches and recomputes otherwise.

Each batch row is a pair (`jtrain.tasks.preference_examples`): both sequences go through the
model in one [2B, L] forward pass, and a sequence's log-probability is the sum over its
completion tokens. The loss and the metrics (TRL's names: rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected) are sums over real pairs,
so they do not depend on the micro-batch or device split. At step 0, with the policy equal to
its reference, the sigmoid loss is ln 2 and rewards/accuracies is 0 (no pair is preferred yet).
Precomputed reference log-probs ride with the pairs as the feature `ref_logps` [N, 2] and are
the same numbers the reference's forward pass gives inside the step.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from jtrain import console, tasks
from jtrain.data import sources
from jtrain.data.array_rows import ArrayExamples
from jtrain.models import lora
from jtrain.models.transformer import TransformerConfig
from jtrain.tasks import dpo_losses, dpo_reference, preference_examples
from jtrain.tasks.base import Batch, FrozenModel, GenerationSet, LossOutput, Task, section
from jtrain.tasks.pair_logps import pair_rows, sequence_logps
from jtrain.tasks.sft import SFTTask
from jtrain.validation import ConfigError, one_of, require

REFERENCE = "reference"  # the frozen model's name in TrainState.frozen
NO_REFERENCE = "none"
REF_LOGPS = "ref_logps"  # precomputed: the reference's (chosen, rejected) log-probs [N, 2]
REFERENCE_LOGPS = "reference_logps.json"  # where a run keeps them, in its workdir
# The parts of the precomputed log-probs' fingerprint, as a note names them when one changed.
_PARTS = {"reference": "reference weights", "model": "model settings", "data": "pairs"}
_DEFAULTS = {
    "loss": "sigmoid",
    "beta": 0.1,
    "label_smoothing": 0.0,
    "gamma": 0.0,
    "sft_weight": 0.0,
    "reference": "",
    "precompute_reference": False,
}


def settings(config) -> dict:
    return section(config, "dpo", _DEFAULTS)


@tasks.register("dpo")
class DPOTask(SFTTask):
    """Batch keys: tokens, completion [B, 2, L + 1], lengths [B, 2], margin, loss_weight [B]."""

    name = "dpo"
    model_reads = "tokens"

    def __init__(self, config):
        super().__init__(config)
        # Precomputed: each source's and split's reference log-probs [N, 2], by (source, split).
        self._ref_logps: dict[tuple[str, str], np.ndarray] | None = None

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
        cls._validate_precompute(config, s, free)
        cls.validate_data(config)

    @staticmethod
    def _validate_precompute(config, s: dict, free: bool) -> None:
        precompute = s["precompute_reference"]
        require(
            isinstance(precompute, (bool, np.bool_)),
            "dpo.precompute_reference",
            precompute,
            "must be True or False",
        )
        if precompute and free:
            raise ConfigError(
                f"dpo.precompute_reference=True is invalid with dpo.loss={s['loss']!r}, which "
                "reads no reference; set it to False."
            )
        if precompute and not (s["reference"] or config.model.init_from):
            raise ConfigError(
                "dpo.precompute_reference=True needs the reference's weights from a spec: set "
                "--config.model.init_from (the run to start from) or --config.dpo.reference."
            )

    @classmethod
    def validate_data(cls, config) -> None:
        """The checks every preference task shares (the pipeline checks `data.source`)."""
        super(SFTTask, cls).validate(config)  # the LM's: SFT's chat-source checks do not apply

    @property
    def settings(self) -> dict:
        return settings(self.config)

    def source_specs(self, source: str) -> tuple[sources.SourceSpec, ...]:
        return preference_examples.parse_spec(source)

    def _pairs_of(self, spec: sources.SourceSpec, split: str) -> ArrayExamples:
        data = self.config.data
        length = self.config.train.seq_len + 1  # inputs and targets are the row shifted by one
        return preference_examples.load_pairs(
            spec, split, data.tokenizer, data.chat_template, length
        )

    def examples(self, spec: sources.SourceSpec, split: str):
        pairs = self._pairs_of(spec, split)
        if self._ref_logps is None:  # not precomputed (or not yet: counting examples)
            return pairs
        logps = self._ref_logps.get((str(spec), split))
        if logps is None or len(logps) != len(pairs):
            raise ValueError(
                f"the precomputed reference log-probs do not cover the {split} split of "
                f"{spec} ({len(pairs)} pairs); delete {REFERENCE_LOGPS} from the workdir to "
                "compute them again."
            )
        return ArrayExamples({**pairs.features, REF_LOGPS: logps})

    def _reference_is_base(self) -> bool:
        """A LoRA run's default reference: its own base, adapters off."""
        lora_run = lora.LoRAConfig.from_config(self.config.model).rank > 0
        return lora_run and not self.settings["reference"]

    def _needs_reference(self) -> bool:
        return self.settings["loss"] not in dpo_losses.REFERENCE_FREE

    def _precomputed(self) -> bool:
        return self._needs_reference() and bool(self.settings["precompute_reference"])

    def frozen_models(self):
        if not self._needs_reference() or self._reference_is_base() or self._precomputed():
            return {}
        return {REFERENCE: FrozenModel(self.make_model, init_from=self.settings["reference"])}

    # Precomputed reference log-probs (dpo.precompute_reference).

    def reference_spec(self) -> str:
        return self.settings["reference"] or self.config.model.init_from

    def artifacts_names(self) -> tuple[str, ...]:
        return (REFERENCE_LOGPS,) if self._precomputed() else ()

    def load_artifacts(self, files: dict[str, dict]) -> None:
        if REFERENCE_LOGPS in files:  # for examples read later; the model itself needs none
            self._ref_logps = dpo_reference.decode_logps(files[REFERENCE_LOGPS]["logps"])

    def artifacts(self, exp, previous: dict[str, dict]) -> dict[str, dict]:
        """The reference's log-probs of every pair: the workdir's while their fingerprint
        matches, else computed (the reference loaded, run over the pairs, dropped)."""
        if not self._precomputed():
            return {}
        pairs = {
            (str(spec), split): self._pairs_of(spec, split)
            for spec in self.source_specs(self.config.data.source)
            for split in sources.SPLITS
        }
        about = dpo_reference.fingerprint_parts(self, pairs)
        fingerprint = dpo_reference.sha256(json.dumps(about, sort_keys=True, default=str))
        saved = previous.get(REFERENCE_LOGPS)
        if saved is not None and saved.get("fingerprint") == fingerprint:
            self._ref_logps = dpo_reference.decode_logps(saved["logps"])
            console.status(f"jtrain: reference log-probs reused from {REFERENCE_LOGPS}")
            return {REFERENCE_LOGPS: saved}
        if saved is not None:
            now = json.loads(json.dumps(about, default=str))  # as JSON reads it back
            was = saved.get("about", {})
            changed = [_PARTS[part] for part in now if now[part] != was.get(part)] or ["inputs"]
            console.status(
                f"jtrain: {REFERENCE_LOGPS} holds log-probs of other {' and '.join(changed)}: "
                "computing them again",
            )
        self._ref_logps = dpo_reference.compute(self, exp, pairs)
        return {
            REFERENCE_LOGPS: {
                "fingerprint": fingerprint,
                "about": about,
                "pairs": {f"{src} {split}": len(v) for (src, split), v in self._ref_logps.items()},
                "logps": dpo_reference.encode_logps(self._ref_logps),
            }
        }

    def _reference_logps(self, model, frozen, tokens, completion):
        if self._reference_is_base():
            reference = lora.adapters_off(model)
        else:
            reference = frozen[REFERENCE]
        logps, _ = sequence_logps(reference, tokens, completion)
        return jax.lax.stop_gradient(logps)

    def loss(self, model, batch: Batch, *, dropout_rng=None, frozen=None) -> LossOutput:
        s = self.settings
        tokens, completion = pair_rows(batch, "tokens"), pair_rows(batch, "completion")
        logps, counts = sequence_logps(model, tokens, completion, dropout_rng=dropout_rng)
        ref = None
        if REF_LOGPS in batch:
            ref = jax.lax.stop_gradient(pair_rows(batch, REF_LOGPS))
        elif self._precomputed():
            raise ValueError(
                "dpo.precompute_reference=True, but the batch holds no reference log-probs: "
                "a run computes them when it starts; outside one, call "
                "task.artifacts(exp, {}) before making batches."
            )
        elif self._needs_reference():
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

    def batch_shapes(self) -> None:
        return None  # not the language model's token rows: only the data pipeline knows

    def flops_per_example(self, *, weight_grads: bool = True) -> float:
        seq_len = self.config.train.seq_len
        per_token = TransformerConfig.from_mapping(self.config.model).flops_per_token(
            seq_len, weight_grads=weight_grads
        )
        # Two sequences trained; the reference's forward pass is a third of a training pass.
        reference = 1 / 3 if self._needs_reference() and not self._precomputed() else 0.0
        return 2 * seq_len * per_token * (1 + reference)

    def tokens_per_example(self) -> int:
        return 2 * self.config.train.seq_len

    def generation_set(self, split: str, limit: int) -> GenerationSet | None:
        """Each pair's prompt, its chosen completion the reference."""
        data = self.config.data
        return preference_examples.generation_set(
            self.source_specs(data.source), split, data.tokenizer, data.chat_template, limit
        )
