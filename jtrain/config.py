"""Config validation and serialisation: every bad value fails before anything compiles.

ml_collections already rejects misspelled keys and wrong types when the config is locked;
this module checks the values, and names the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Mapping

import ml_collections

from jtrain import atomic, console, early_stopping, models, optim, pretrained, recipes, tasks
from jtrain.data import pipeline
from jtrain.mesh import parse_rules
from jtrain.models import lora
from jtrain.validation import ConfigError, one_of, positive_ints, require

__all__ = ["ConfigError", "load", "prepare", "save_json", "validate"]


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first value that cannot work.

    Each group of keys is checked by its owner: the task, the model family, LoRA, the data
    pipeline, the optimizer; this function owns the loop's own keys (train, eval, checkpoint,
    mesh, metrics).
    """
    _finite_numbers(config.to_dict())
    task_class = tasks.task_class(config.task)
    reads = task_class.reads(config)
    kind, allowed = config.model.get("kind", "transformer"), models.kinds_reading(reads)
    why = f"task={config.task} needs a model of {reads}; allowed: "
    require(kind in allowed, "model.kind", kind, why + ", ".join(allowed))
    models.family_of(config.model).validate(config)
    lora.validate(config)
    _validate_loop(config)
    try:
        task = task_class(config)
        pipeline.validate_data_config(config, task)
        task_class.validate(config)  # e.g. the vocabulary, the chat template
        _schedule_by_epochs(config, task)
        for note in optim.validate(config):
            console.status(f"jtrain: {note}")
    except ConfigError:
        raise
    except ValueError as err:  # the data package names its keys without "config."
        message = str(err)
        keyed = message.startswith(("data.", "train.", "eval.", "seed"))
        raise ConfigError(f"config.{message}" if keyed else message) from None


def _finite_numbers(tree: dict, prefix: str = "") -> None:
    """No setting may be inf or NaN: every check below compares numbers, and `lr > 0` holds
    for inf (a run would only fail at its first step, blamed on the data)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _finite_numbers(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            require(False, f"{prefix}{key}", value, "must be a finite number")


def _validate_loop(config) -> None:
    t = config.train
    # train.batch_size, train.seq_len, eval.steps and seed: the data pipeline's (it builds
    # the batches).
    positive_ints(t, "train", ["steps", "microbatches", "log_every"])
    epochs = t.get("epochs", 0)
    ok = isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0
    require(ok, "train.epochs", epochs, "must be an integer >= 0 (0 = train.steps decides)")
    early_stopping.validate(config)
    one_of("train.on_nonfinite", t.on_nonfinite, ("halt", "skip"))
    require(
        t.batch_size % t.microbatches == 0,
        "train.microbatches",
        t.microbatches,
        f"must divide train.batch_size={t.batch_size}",
    )
    e = config.eval
    require(e.every_steps >= 0, "eval.every_steps", e.every_steps, "must be >= 0 (0 = at the end)")
    one_of("eval.split", e.split, ("val", "test"))
    g = e.generate
    require(g.examples >= 0, "eval.generate.examples", g.examples, "must be >= 0 (0 = off)")
    require(g.max_new_tokens >= 1, "eval.generate.max_new_tokens", g.max_new_tokens, "must be >= 1")
    require(g.temperature >= 0, "eval.generate.temperature", g.temperature, "must be >= 0")
    require(e.sample_tokens >= 0, "eval.sample_tokens", e.sample_tokens, "must be >= 0")
    temperature = e.sample_temperature
    require(temperature >= 0, "eval.sample_temperature", temperature, "must be >= 0 (0 = greedy)")

    ck = config.checkpoint
    every = ck.every_steps
    require(every >= 0, "checkpoint.every_steps", every, "must be >= 0 (0 = only at the end)")
    require(ck.keep >= 1, "checkpoint.keep", ck.keep, "must be at least 1")
    init_from = config.model.init_from
    problem = pretrained.check(init_from)
    require(problem is None, "model.init_from", init_from, str(problem))

    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        require(size == -1 or size > 0, f"mesh.{axis}", size, "must be positive or -1 (the rest)")
    try:
        parse_rules(config.mesh.rules)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    peak = config.metrics.peak_flops_per_device
    require(peak >= 0, "metrics.peak_flops_per_device", peak, "must be >= 0 (0 = auto)")
    p = config.profile
    require(p.steps >= 0, "profile.steps", p.steps, "must be >= 0 (0 = no profile)")
    require(p.start_step >= 1, "profile.start_step", p.start_step, "must be >= 1 (a step number)")


def _schedule_by_epochs(config, task) -> None:
    """With train.epochs, sets train.steps and an evaluation every epoch; with early stopping,
    a checkpoint at every evaluation (the best is restored at the end). Prints each change."""
    t, changes = config.train, []
    if t.get("epochs", 0):
        examples = pipeline.epoch_examples(config, task=task)
        per_epoch = -(-examples // t.batch_size)
        changes.append(f"train.epochs={t.epochs} of {examples} examples: train.steps=")
        t.steps = t.epochs * per_epoch
        changes[-1] += f"{t.steps} ({per_epoch} per epoch), eval.every_steps={per_epoch}"
        config.eval.every_steps = per_epoch
    if early_stopping.Settings.from_config(config):
        every = config.eval.every_steps
        require(
            every > 0,
            "eval.every_steps",
            every,
            "must be > 0 with train.early_stopping (it watches the evaluations); or set "
            "train.epochs to evaluate every epoch",
        )
        ck = config.checkpoint
        if ck.every_steps != every or not ck.keep_best:
            ck.every_steps, ck.keep_best = every, True
            changes.append(f"checkpoint.every_steps={every} and keep_best=True (early stopping)")
    for change in changes:
        console.status(f"jtrain: {change}")


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


def save_json(config: ml_collections.ConfigDict | Mapping, workdir: str) -> str:
    """Writes the resolved config to workdir/config.json and returns the path: whole or not
    at all, so a failed write (a full disk) leaves the previous file, or none."""
    path = os.path.join(workdir, "config.json")
    content = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config

    def dump(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic.write(path, dump)
    return path


def load(path: str) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file or a recipe's name (`load("default")`), `:ARG`
    included, as --config does (for notebooks and tests)."""
    resolved = recipes.resolve(path)
    if resolved is None:
        raise ConfigError(f"{path!r}: {recipes.no_such_config()}")
    file, colon, arg = resolved.partition(":")
    spec = importlib.util.spec_from_file_location("jtrain_config_file", file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load a config from {path!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if colon else module.get_config()
