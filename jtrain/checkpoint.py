"""Orbax checkpoints of a run: train state, data-iterator position, config and metadata.

Saves are asynchronous (the device-to-host copy is the only blocking part) and atomic
(Orbax writes into a temporary directory and renames it when complete), so a kill at any
moment leaves the previous checkpoints intact. Restoring walks back from the newest
checkpoint to the newest one that reads completely, so a damaged file costs one interval.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jtrain.state import TrainState

log = logging.getLogger(__name__)

# Keys whose change makes an existing checkpoint belong to a different run. Mesh, eval,
# logging and train.steps may change on resume (resharding, extending a run).
IDENTITY_KEYS = ("seed", "task", "model", "data", "optimizer.name", "train.batch_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


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
        for name in sorted(set(old) | set(new)):
            if name == "model.init_from":  # where the weights came from, not what they are
                continue
            if old.get(name) != new.get(name):
                diffs.append(f"{name}: {old.get(name)!r} -> {new.get(name)!r}")
    return diffs


def _path_name(path) -> str:
    """'params/blocks/attn/q_DxHxK' from a pytree path of a state or of Orbax metadata."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(n for n in names if n != "value")  # nnx's Param wraps arrays in .value


def shape_mismatches(saved_tree, expected_tree) -> list[str]:
    """Parameters whose shape or presence differs between a checkpoint and the model."""

    def shapes(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {_path_name(p): tuple(x.shape) for p, x in leaves}

    saved, expected = shapes(saved_tree), shapes(expected_tree)
    problems = [
        f"{name}: checkpoint {saved[name]} vs config {expected[name]}"
        for name in sorted(saved.keys() & expected.keys())
        if saved[name] != expected[name]
    ]
    problems += [f"{name}: missing from the checkpoint" for name in sorted(expected - saved.keys())]
    problems += [f"{name}: not in the model" for name in sorted(saved.keys() - expected.keys())]
    return problems


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every float in the tree is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, np.floating)]
    return jax.numpy.all(jax.numpy.array([jax.numpy.all(jax.numpy.isfinite(x)) for x in leaves]))


def _item_handlers() -> dict:
    """Declared up front, so a fresh process can read metadata before restoring anything."""
    json_items = ("data", "config", "meta")
    return {"state": ocp.StandardCheckpointHandler()} | {
        name: ocp.JsonCheckpointHandler() for name in json_items
    }


class Checkpoints:
    """The run's CheckpointManager: keeps the last `keep` plus the best by validation loss."""

    def __init__(self, workdir: str, ckpt_cfg, *, best_metric: str = "loss"):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.best_metric = best_metric
        keep = [policies.LatestN(ckpt_cfg.keep)]
        if ckpt_cfg.keep_best:
            # Ascending sort keeps the largest: reverse it so the smallest loss survives.
            keep.append(
                policies.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,  # else LatestN never deletes
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_item_handlers()
        )

    # -- inspection -------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    # -- saving -----------------------------------------------------------------------------

    def save(
        self,
        state: TrainState,
        *,
        data_state: Any,
        config: Mapping,
        metrics: Mapping[str, float] | None = None,
        started: float,  # time.perf_counter() at the start of the run
    ) -> bool:
        """Starts an async save of `state` at its step; refuses non-finite values."""
        step = int(jax.device_get(state.step))
        if not bool(all_finite(state)):
            log.error("not saving step %d: the state holds non-finite values", step)
            return False
        meta = {
            "step": step,
            "wall_time": time.perf_counter() - started,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "jax_version": jax.__version__,
            "jtrain_version": _jtrain_version(),
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(dict(config)),
            meta=ocp.args.JsonSave(meta),
        )
        best = {self.best_metric: metrics[self.best_metric]} if metrics else None
        return self.manager.save(step, args=args, metrics=best, force=True)

    def wait(self) -> None:
        """Blocks until every pending save is committed to disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- restoring --------------------------------------------------------------------------

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, Any, int] | None:
        """(state, data_state, step) from the newest readable checkpoint, or None if none.

        `abstract_state` carries the target shardings, which may differ from those the
        checkpoint was saved with (resharding). Damaged checkpoints are skipped with a warning.
        """
        steps = self.steps()
        for step in reversed(steps):
            self._check_shapes(step, abstract_state)
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        config=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as err:  # noqa: BLE001 - any read failure means damaged
                log.warning(
                    "checkpoint %s/%d is damaged (%s: %s); falling back to an older one",
                    self.directory,
                    step,
                    type(err).__name__,
                    str(err)[:200],
                )
                continue
            return restored["state"], restored["data"], step
        if steps:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be read (steps {steps}); move the "
                "directory away to start afresh, or set --config.checkpoint.overwrite=True."
            )
        return None

    def _check_shapes(self, step: int, abstract_state: TrainState) -> None:
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - unreadable metadata: let restore() report it
            return
        if saved is None:
            return
        problems = shape_mismatches({"params": saved["params"]}, {"params": abstract_state.params})
        if problems:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match the model in the config:\n  "
                + "\n  ".join(problems[:20])
                + "\nUse a workdir of its own for a different model, or "
                "--config.checkpoint.overwrite=True to replace these checkpoints."
            )


def prepare_workdir(workdir: str, config: Mapping, *, overwrite: bool) -> None:
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


def load_params(path: str, abstract_params, *, step: int | None = None):
    """Parameters only (no optimizer or data state) from a jtrain workdir or checkpoint dir."""
    path = os.path.abspath(os.path.expanduser(path))  # Orbax takes absolute paths only
    directory = path if os.path.basename(path.rstrip("/")) == "checkpoints" else None
    if directory is None:
        candidate = os.path.join(path, "checkpoints")
        directory = candidate if os.path.isdir(candidate) else path
    if not os.path.isdir(directory):
        raise CheckpointError(f"model.init_from={path!r}: no such checkpoint directory")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    )
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"model.init_from={path!r}: {directory} holds no checkpoint")
    saved = manager.item_metadata(step)["state"]
    problems = shape_mismatches(saved["params"], abstract_params)
    if problems:
        raise CheckpointError(
            f"model.init_from={path!r} (step {step}) does not match the configured model:\n  "
            + "\n  ".join(problems[:20])
        )
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params
    )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={"params": abstract_params},
                restore_args={"params": restore_args},
                partial_restore=True,
            )
        ),
    )
    manager.close()
    return restored["state"]["params"]


def _jtrain_version() -> str:
    try:
        from importlib.metadata import version

        return version("jtrain")
    except Exception:  # noqa: BLE001 - running from a source tree without installing
        return "unknown"
