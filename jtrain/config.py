"""Config validation and serialisation: every bad value fails before anything compiles.

ml_collections already rejects misspelled keys and wrong types when the config is locked;
this module checks the values, and names the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import ml_collections

from jtrain import optim, pretrained, tasks
from jtrain.data import pipeline, tokenizers
from jtrain.mesh import parse_rules
from jtrain.models import lora, transformer


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key and what is allowed."""


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}={value!r} is invalid: {allowed}.")


def _positive_ints(config, keys: list[str]) -> None:
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        _require(isinstance(value, int) and value > 0, key, value, "must be a positive integer")


def _one_of(key: str, value, allowed) -> None:
    _require(value in allowed, key, value, f"allowed: {', '.join(map(str, allowed))}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first value that cannot work."""
    _one_of("task", config.task, tasks.TASKS)
    _validate_model(config)
    try:  # sources, tokenizer (name or path), packing, workers: checked by the data package
        pipeline.validate_data_config(config)
    except ValueError as err:
        raise ConfigError(f"config.{err}" if str(err).startswith("data.") else str(err)) from None
    vocab = tokenizers.get_tokenizer(config.data.tokenizer).vocab_size
    _require(
        config.model.vocab_size >= vocab,
        "model.vocab_size",
        config.model.vocab_size,
        f"must be at least the tokenizer's vocabulary size ({vocab})",
    )

    t = config.train
    _positive_ints(config, ["train.steps", "train.batch_size", "train.seq_len"])
    _positive_ints(config, ["train.microbatches", "train.log_every"])
    _one_of("train.on_nonfinite", t.on_nonfinite, ("halt", "skip"))
    _require(
        t.batch_size % t.microbatches == 0,
        "train.microbatches",
        t.microbatches,
        f"must divide train.batch_size={t.batch_size}",
    )
    e = config.eval
    _require(e.every_steps >= 0, "eval.every_steps", e.every_steps, "must be >= 0 (0 = at the end)")
    _require(e.steps == -1 or e.steps > 0, "eval.steps", e.steps, "must be -1 (all) or positive")
    _require(e.sample_tokens >= 0, "eval.sample_tokens", e.sample_tokens, "must be >= 0")
    temperature = e.sample_temperature
    _require(temperature >= 0, "eval.sample_temperature", temperature, "must be >= 0 (0 = greedy)")

    ck = config.checkpoint
    every = ck.every_steps
    _require(every >= 0, "checkpoint.every_steps", every, "must be >= 0 (0 = only at the end)")
    _require(ck.keep >= 1, "checkpoint.keep", ck.keep, "must be at least 1")
    init_from = config.model.init_from
    problem = pretrained.check(init_from)
    _require(problem is None, "model.init_from", init_from, str(problem))

    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        _require(size == -1 or size > 0, f"mesh.{axis}", size, "must be positive or -1 (the rest)")
    try:
        parse_rules(config.mesh.rules)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    _validate_optimizer(config)
    _validate_lora(config)
    peak = config.metrics.peak_flops_per_device
    _require(peak >= 0, "metrics.peak_flops_per_device", peak, "must be >= 0 (0 = auto)")


def _validate_model(config) -> None:
    m = config.model
    _positive_ints(
        config,
        [f"model.{k}" for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads")]
        + ["model.head_dim", "model.d_ff"],
    )
    _require(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_kv_heads",
        m.n_kv_heads,
        f"must divide model.n_heads={m.n_heads} (grouped-query attention)",
    )
    _require(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even (rotary embedding)")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "must be in [0, 1)")
    _require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be positive")
    _require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be positive")
    _one_of("model.dtype", m.dtype, transformer.DTYPES)
    _one_of("model.remat", m.remat, transformer.REMAT_POLICIES)
    _one_of("model.attention", m.attention, transformer.ATTENTION_IMPLEMENTATIONS)
    for name, allowed in transformer.CHOICES.items():
        _one_of(f"model.{name}", m[name], allowed)
    _require(m.max_seq_len >= 0, "model.max_seq_len", m.max_seq_len, "must be >= 0")
    if m.positions == "learned":
        seq_len = config.train.seq_len
        _require(
            m.max_seq_len >= seq_len,
            "model.max_seq_len",
            m.max_seq_len,
            f"must be at least train.seq_len={seq_len} with learned positions (its table's rows)",
        )
    _require(m.sliding_window >= 0, "model.sliding_window", m.sliding_window, "must be >= 0")
    _require(m.rope_factor > 0, "model.rope_factor", m.rope_factor, "must be positive")


def _validate_lora(config) -> None:
    lora_cfg = config.model.get("lora")
    if lora_cfg is None:  # a config written before LoRA existed: no adapters
        return
    rank, alpha, dropout = lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout
    _require(isinstance(rank, int) and rank >= 0, "model.lora.rank", rank, "must be >= 0 (0 = off)")
    _require(alpha > 0, "model.lora.alpha", alpha, "must be positive (the scale is alpha / rank)")
    _require(0.0 <= dropout < 1.0, "model.lora.dropout", dropout, "must be in [0, 1)")
    targets = lora.parse_targets(lora_cfg.targets)
    unknown = lora.unmatched_targets(targets)
    _require(
        bool(targets) and not unknown,
        "model.lora.targets",
        lora_cfg.targets,
        f"{', '.join(unknown) or 'it'} matches no kernel; give comma-separated names or glob "
        f"patterns over {', '.join(lora.TARGET_NAMES)} (or attn.q, mlp.up, ...), or 'all'",
    )
    _one_of("model.lora.base_dtype", lora_cfg.base_dtype, lora.BASE_DTYPES)
    _require(
        rank > 0 or lora_cfg.base_dtype == "float32",
        "model.lora.base_dtype",
        lora_cfg.base_dtype,
        "needs model.lora.rank > 0: only a frozen base is stored in a lower precision",
    )


def _validate_optimizer(config) -> None:
    o, s = config.optimizer, config.schedule
    _one_of("optimizer.name", o.name, optim.OPTIMIZERS)
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be positive")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    _require(o.clip_norm >= 0, "optimizer.clip_norm", o.clip_norm, "must be >= 0 (0 = off)")
    for key in ("b1", "b2"):
        _require(0 <= o[key] < 1, f"optimizer.{key}", o[key], "must be in [0, 1)")
    _one_of("schedule.name", s.name, optim.SCHEDULES)
    _require(
        0 <= s.warmup_steps <= config.train.steps,
        "schedule.warmup_steps",
        s.warmup_steps,
        f"must be between 0 and train.steps={config.train.steps}",
    )
    _require(0 <= s.final_lr_ratio <= 1, "schedule.final_lr_ratio", s.final_lr_ratio, "in [0, 1]")
    _require(0 < s.decay_fraction <= 1, "schedule.decay_fraction", s.decay_fraction, "in (0, 1]")


def prepare(config: ml_collections.ConfigDict) -> list[str]:
    """Resolves what the config leaves to other files, then validates it.

    With `model.init_from="hf:PATH"`, the model's architecture keys are set from PATH's
    config.json. Returns a line per key that changed, for the log.
    """
    try:
        changes = pretrained.apply_architecture(config)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config.model.init_from={config.model.init_from!r}: {err}") from None
    validate(config)
    return changes


def save_json(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the resolved config to workdir/config.json and returns the path."""
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def load(path: str) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file, as --config does (for notebooks and tests)."""
    # Variants import their base as `from configs import default`: make the folder that holds
    # configs/ importable, wherever the caller runs from.
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("jtrain_config_file", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load a config from {path!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
