"""A run's workdir: whose checkpoints it holds, and refusing one that belongs to another run.

A workdir's config.json records the run that wrote its checkpoints. A new start compares the
settings that decide what the checkpoints mean (IDENTITY_KEYS) and refuses to resume another
run's checkpoints unless told to replace them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax

from jtrain.checkpoint import CheckpointError

# Keys whose change makes an existing checkpoint belong to a different run. Mesh, eval,
# logging and train.steps may change on resume (resharding, extending a run).
IDENTITY_KEYS = ("seed", "task", "model", "data", "optimizer.name", "train.batch_size")


def _get(tree: Mapping, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(saved: Mapping, current: Mapping) -> list[str]:
    """`key: saved -> current` for every identity key whose value changed."""
    diffs = []
    for key in IDENTITY_KEYS:
        old, new = _flatten(_get(saved, key) or {}, key), _flatten(_get(current, key) or {}, key)
        # A key the saved config lacks was added to jtrain after that run was written: the
        # run behaved as its default does, so only keys both configs hold are compared.
        for name in sorted(old.keys() & new.keys() if old else new.keys()):
            if name == "model.init_from":  # where the weights came from, not what they are
                continue
            if old.get(name) != new.get(name):
                diffs.append(f"{name}: {old.get(name)!r} -> {new.get(name)!r}")
    return diffs


def prepare(workdir: str, config: Mapping, *, overwrite: bool) -> None:
    """Refuses to reuse a workdir whose checkpoints belong to a different config."""
    directory = os.path.join(workdir, "checkpoints")
    saved_path = os.path.join(workdir, "config.json")
    if not os.path.isdir(directory) or not os.listdir(directory):
        return
    if overwrite:
        if jax.process_index() == 0:  # one deleter; the others wait at the caller's barrier
            print(f"checkpoint.overwrite=True: deleting the previous run's {directory}")
            shutil.rmtree(directory)
        return
    try:
        with open(saved_path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if saved is None:
        raise CheckpointError(
            f"{directory} holds checkpoints but {saved_path} is missing or unreadable, so "
            "jtrain cannot tell whose they are. Use another --workdir, or "
            "--config.checkpoint.overwrite=True to replace them."
        )
    diffs = config_differences(saved, config)
    if diffs:
        raise CheckpointError(
            f"{workdir} holds checkpoints of a different run; these settings differ:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the original settings, use another --workdir, or pass "
            "--config.checkpoint.overwrite=True to delete those checkpoints."
        )
