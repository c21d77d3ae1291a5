"""Orbax checkpoints of a run: train state, data-iterator position, config and metadata.

Saves are asynchronous (the device-to-host copy is the only blocking part) and atomic
(Orbax writes into a temporary directory and renames it when complete), so a kill at any
moment leaves the previous checkpoints intact. Restoring walks back from the newest
checkpoint to the newest one that reads completely, so a damaged file costs one interval.

The state is saved packed into a few flat arrays (jtrain.packed_state: Orbax's cost grows
with the number of arrays) and restores onto any mesh. The data position, config and run
metadata ride in the step's metadata file, which Orbax writes before the commit rename.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies

from jtrain import packed_state
from jtrain.errors import UserError
from jtrain.models.transformer import HEAD_PARAMS
from jtrain.state import TrainState

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to do."""


def shape_mismatches(saved_tree, expected_tree) -> list[str]:
    """Parameters whose shape or presence differs between a checkpoint and the model."""

    return packed_state.shape_problems(
        packed_state.shapes(saved_tree), packed_state.shapes(expected_tree)
    )


def _item_handlers() -> dict:
    """Declared up front, so a fresh process can read metadata before restoring anything."""
    # Compression costs more CPU than it saves bytes on trained float weights.
    return {"state": ocp.PyTreeCheckpointHandler(use_compression=False)}


def _legacy_manager(directory: str) -> ocp.CheckpointManager:
    """Reads checkpoints from before packing: a per-leaf state and three JSON items."""
    handlers = {"state": ocp.StandardCheckpointHandler()}
    handlers |= {name: ocp.JsonCheckpointHandler() for name in ("data", "config", "meta")}
    options = ocp.CheckpointManagerOptions(read_only=True)
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _saved_layout(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """A packed checkpoint's custom step metadata, or None for one from before packing."""
    try:
        custom = manager.metadata(step).custom_metadata or {}
    except Exception:  # noqa: BLE001 - unreadable: neither kind, reported below
        custom = {}
    if "layout" in custom:
        return custom
    if os.path.isdir(os.path.join(str(manager.directory), str(step), "data")):
        return None  # before packing, the data position was an item of its own
    raise ValueError(f"the metadata of step {step} (its layout and data position) is unreadable")


class Checkpoints:
    """The run's CheckpointManager: keeps the last `keep` plus the best by a validation metric
    (`best_metric`, lower is better with best_mode="min", higher with "max")."""

    def __init__(
        self,
        workdir: str,
        ckpt_cfg,
        *,
        best_metric: str = "loss",
        best_mode: str = "min",
        read_only: bool = False,
    ):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.best_metric = best_metric
        keep = [policies.LatestN(ckpt_cfg.keep)]
        if ckpt_cfg.keep_best:
            # Ascending sort keeps the largest: reversed, the smallest survives.
            keep.append(
                policies.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,  # else LatestN never deletes
                )
            )
        if read_only:  # evaluation: never create, write or delete anything
            options = ocp.CheckpointManagerOptions(read_only=True)
        else:
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
        layout, pack = packed_state.packer_for(state)
        packed, finite = pack(state)  # copies the state, so the next step may donate it
        if not bool(finite):
            log.error("not saving step %d: the state holds non-finite values", step)
            return False
        meta = {
            "step": step,
            "wall_time": time.perf_counter() - started,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "jax_version": jax.__version__,
            "jtrain_version": _jtrain_version(),
        }
        custom = {"data": data_state, "config": dict(config), "meta": meta, "layout": layout}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(packed_state.nest(packed)))
        found = metrics is not None and self.best_metric in metrics
        best = {self.best_metric: metrics[self.best_metric]} if found else None
        return self.manager.save(step, args=args, metrics=best, force=True, custom_metadata=custom)

    def wait(self) -> None:
        """Blocks until every pending save is committed to disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- restoring --------------------------------------------------------------------------

    def restore_latest(
        self, abstract_state: TrainState, *, step: int | None = None
    ) -> tuple[TrainState, Any, int] | None:
        """(state, data_state, step) from the newest readable checkpoint, or None if none.

        `abstract_state` carries the target shardings, which may differ from those the
        checkpoint was saved with (resharding). Damaged checkpoints are skipped with a warning.
        With `step`, only that checkpoint is read.
        """
        steps = self.steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"{self.directory} has no checkpoint of step {step}; it has {steps or 'none'}."
                )
            steps = [step]
        for step in reversed(steps):
            try:
                custom = _saved_layout(self.manager, step)
                self._check_shapes(step, custom, abstract_state)
                if custom is None:
                    state, data_state = self._restore_legacy(step, abstract_state)
                else:
                    state = packed_state.restore(
                        self.manager, step, custom["layout"], abstract_state
                    )
                    data_state = custom["data"]
            except CheckpointError:
                raise
            except Exception as err:  # noqa: BLE001 - any read failure means damaged
                log.warning(
                    "checkpoint %s/%d is damaged (%s: %s); falling back to an older one",
                    self.directory,
                    step,
                    type(err).__name__,
                    str(err)[:200],
                )
                continue
            return state, data_state, step
        if steps:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be read (steps {steps}); move the "
                "directory away to start afresh, or set --config.checkpoint.overwrite=True."
            )
        return None

    def _restore_legacy(self, step: int, abstract_state: TrainState) -> tuple[TrainState, Any]:
        manager = _legacy_manager(self.directory)
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                ),
            )
        finally:
            manager.close()
        return restored["state"], restored["data"]

    def _check_shapes(self, step: int, custom: dict | None, abstract_state: TrainState) -> None:
        if custom is not None:
            problems = packed_state.layout_problems(custom["layout"], abstract_state, "")
        else:
            try:
                saved = self.manager.item_metadata(step)["state"]
            except Exception:  # noqa: BLE001 - unreadable metadata: let restore() report it
                return
            if saved is None:
                return
            problems = shape_mismatches(
                {"params": saved["params"]}, {"params": abstract_state.params}
            )
        if problems:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not match the model in the config:\n  "
                + "\n  ".join(problems[:20])
                + "\nUse a workdir of its own for a different model, or "
                "--config.checkpoint.overwrite=True to replace these checkpoints."
            )


def _trunk_only(layout: dict, abstract_params) -> tuple[dict, object]:
    """The saved layout and the model's parameters without the head that only one side has:
    weights of a model with another head (an LM run into a reward model) load the trunk, and
    the model's own head keeps its fresh initialisation."""
    saved = {e["name"] for e in layout["leaves"]}
    model = set(packed_state.shapes(abstract_params))
    skip = {name for name in HEAD_PARAMS if (f"params/{name}" in saved) != (name in model)}
    if not skip:
        return layout, abstract_params
    leaves = [e for e in layout["leaves"] if e["name"].removeprefix("params/") not in skip]
    kept = nnx.filter_state(abstract_params, lambda keys, _: str(keys[0]) not in skip)
    return {**layout, "leaves": leaves}, kept


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
    try:
        custom = _saved_layout(manager, step)
    except ValueError as err:
        raise CheckpointError(f"model.init_from={path!r}: {err}") from None
    if custom is not None:
        layout, abstract_params = _trunk_only(custom["layout"], abstract_params)
        custom = {**custom, "layout": layout}
        problems = packed_state.layout_problems(layout, abstract_params, "params/")
    else:
        problems = shape_mismatches(manager.item_metadata(step)["state"]["params"], abstract_params)
    if problems:
        raise CheckpointError(
            f"model.init_from={path!r} (step {step}) does not match the configured model:\n  "
            + "\n  ".join(problems[:20])
        )
    try:
        if custom is not None:
            return packed_state.restore(manager, step, custom["layout"], abstract_params, "params/")
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
        return restored["state"]["params"]
    finally:
        manager.close()


def _jtrain_version() -> str:
    try:
        from importlib.metadata import version

        return version("jtrain")
    except Exception:  # noqa: BLE001 - running from a source tree without installing
        return "unknown"
