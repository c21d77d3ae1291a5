"""What a config change means on resume: the table of every config key, and the comparison.

A workdir's config.json records the run that wrote its checkpoints. Started again there, a
run compares its config with it key by key and looks each changed key up in GROUPS:

- REFUSE: the checkpoints, or the data position saved with them, would mean something else
  (the architecture, the data, the batch shape). The run is refused, naming the keys;
  `checkpoint.overwrite=True` replaces that other run instead.
- RECORD: a change a resumed run may make on purpose (a new learning rate or schedule, more
  steps) that changes its results from then on. Accepted, printed and appended to
  WORKDIR/config_changes.jsonl, so the run's results can be explained later.
- FREE: cannot change results (how the computation is laid out, logged, evaluated, saved).

A key the saved config lacks was added to jtrain after that run: the run behaved as the
key's default does, so it is not compared. jtrain.workdir_claim holds the workdir and applies
these rules.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

REFUSE, RECORD, FREE = "refuse", "record", "free"


@dataclasses.dataclass(frozen=True)
class Group:
    """Keys that mean the same on resume: `rule`, and `why` in words for messages."""

    rule: str
    why: str
    keys: tuple[str, ...]  # dotted names; "section.*" stands for every key of a section


_ARCHITECTURE = (
    "model.kind",
    # transformer
    *("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads"),
    *("model.n_kv_heads", "model.head_dim", "model.d_ff", "model.rope_theta", "model.norm_eps"),
    *("model.tie_embeddings", "model.norm", "model.positions", "model.max_seq_len"),
    *("model.qkv_bias", "model.out_bias", "model.mlp_gated", "model.mlp_activation"),
    *("model.mlp_bias", "model.sliding_window", "model.rope_scaling", "model.rope_factor"),
    *("model.rope_low_freq_factor", "model.rope_high_freq_factor", "model.rope_original_max_len"),
    # mlp, cnn, vit
    *("model.width", "model.depth", "model.embed_dim", "model.linear_skip", "model.activation"),
    *("model.channels", "model.stages", "model.blocks", "model.image_size", "model.patch_size"),
    "model.pooling",
)

# Every config key of configs/, of the model families and of the tasks' sections is in one
# group: tests/test_faults_workdir.py fails for a key that none names.
GROUPS = (
    Group(REFUSE, "it seeds the initial weights and the data order the saved position is in",
          ("seed",)),
    Group(REFUSE, "the objective: another task's checkpoints hold another model and data",
          ("task", "distill.task")),
    Group(REFUSE, "the architecture the saved weights are of", _ARCHITECTURE),
    Group(REFUSE, "the shape and scale of the saved adapters",
          ("model.lora.rank", "model.lora.alpha", "model.lora.targets")),
    Group(REFUSE, "what the examples are: the saved data position counts rows of these",
          ("data.source", "data.tokenizer", "data.text_field", "data.chat_template",
           "data.packing", "data.target", "data.features")),
    Group(REFUSE, "the saved data position counts batches of this many rows of this length: "
          "resumed with another, it would silently point elsewhere in the data",
          ("train.batch_size", "train.seq_len")),
    Group(REFUSE, "the data position is saved in the input pipeline's format for this many "
          "workers (Grain's states for 0 and for N workers differ): it would not restore",
          ("data.workers",)),
    Group(REFUSE, "the saved optimizer state is this optimizer's", ("optimizer.name",)),
    Group(REFUSE, "the best checkpoint kept so far (and early_stopping.json) was chosen by "
          "this metric and direction: another would compare unlike values",
          ("train.early_stopping.metric", "train.early_stopping.mode")),
    Group(RECORD, "the learning rate and its schedule: a resumed run may change them",
          ("optimizer.lr", "schedule.name", "schedule.warmup_steps", "schedule.final_lr_ratio",
           "schedule.decay_fraction")),
    Group(RECORD, "the optimizer's coefficients: its saved state still applies",
          ("optimizer.weight_decay", "optimizer.b1", "optimizer.b2", "optimizer.eps",
           "optimizer.clip_norm")),
    Group(RECORD, "how long to train: extending a run is a resume (the schedule follows)",
          ("train.steps", "train.epochs")),
    Group(RECORD, "choices the checkpoints do not depend on, that change results from the "
          "resumed step (precision, regularisation, the non-finite policy, the base's path)",
          ("model.dropout", "model.dtype", "model.lora.dropout", "model.lora.base_dtype",
           "model.init_from", "train.microbatches", "train.on_nonfinite")),
    Group(RECORD, "when early stopping stops, and the validation batches it compares",
          ("train.early_stopping.patience", "train.early_stopping.min_delta", "eval.steps")),
    Group(RECORD, "the task's loss and augmentation: the saved model and position still apply",
          ("classify.label_smoothing", "classify.class_weights", "regress.loss",
           "regress.huber_delta", "reward.center_coefficient", "augment.crop_padding",
           "augment.flip", "augment.color_jitter", "augment.mixup_alpha", "augment.cutmix_alpha",
           "dpo.loss", "dpo.beta", "dpo.label_smoothing", "dpo.gamma", "dpo.sft_weight",
           "dpo.reference", "distill.teacher", "distill.alpha", "distill.temperature",
           "distill.kl")),
    Group(RECORD, "how rollouts are sampled, scored and weighed: the saved prompt position "
          "counts prompts, whatever each rollout does with them",
          ("grpo.rewards", "grpo.num_generations", "grpo.max_completion_length",
           "grpo.temperature", "grpo.top_k", "grpo.top_p", "grpo.scale_rewards", "grpo.loss",
           "grpo.epsilon", "grpo.epsilon_high", "grpo.iterations", "grpo.beta",
           "grpo.reference", "grpo.mask_truncated", "grpo.dynamic_sampling",
           "grpo.dynamic_sampling_rounds")),
    Group(FREE, "the same computation laid out or fed another way",
          ("model.remat", "model.attention", "model.loss_chunk", "data.prefetch",
           "dpo.precompute_reference", "mesh.*")),
    Group(FREE, "what is logged, evaluated or saved, and how often",
          ("train.log_every", "eval.every_steps", "eval.split", "eval.generate.*",
           "eval.sample_tokens", "eval.sample_prompt", "eval.sample_temperature",
           "classify.top_k", "checkpoint.*", "metrics.*", "profile.*", "drift.*")),
)  # fmt: skip
# A key of the user's own (a custom task's section): it may change what the checkpoints mean.
UNKNOWN = Group(REFUSE, "jtrain does not know what this key means for a checkpoint", ())
_BY_KEY = {key: group for group in GROUPS for key in group.keys}


def group_of(key: str) -> Group:
    """The group of a dotted config key: its own entry, else its nearest section's "*"."""
    if key in _BY_KEY:
        return _BY_KEY[key]
    section = key
    while "." in section:
        section = section.rsplit(".", 1)[0]
        if f"{section}.*" in _BY_KEY:
            return _BY_KEY[f"{section}.*"]
    return UNKNOWN


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    @property
    def group(self) -> Group:
        return group_of(self.key)

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every leaf of a nested mapping."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, Mapping) else {name: value})
    return out


def changes(saved: Mapping, current: Mapping) -> list[Change]:
    """Every key both configs hold whose value differs, in key order."""
    # Through JSON, as config.json holds it: tuples become lists, and so on.
    old, new = flatten(saved), flatten(json.loads(json.dumps(dict(current))))
    return [
        Change(key, old[key], new[key])
        for key in sorted(old.keys() & new.keys())
        if not _same(old[key], new[key])
    ]


def config_differences(saved: Mapping, current: Mapping) -> list[str]:
    """`key: saved -> current` for every change that refuses the workdir."""
    return [str(c) for c in changes(saved, current) if c.group.rule == REFUSE]


def _same(a, b) -> bool:
    if isinstance(a, bool) != isinstance(b, bool):  # False == 0 in Python; not as a setting
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b
