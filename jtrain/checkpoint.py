"""Orbax checkpoints of a run: train state, data-iterator positions, config and metadata.

Saves are asynchronous (the device-to-host copy is the only blocking part) and atomic
(Orbax writes into a temporary directory and renames it when complete), so a kill at any
moment leaves the previous checkpoints intact. A save that fails raises a CheckpointError
saying why ("no space left on device at PATH"): at once when its directory cannot be made,
else from the next `save` or `wait`. The checkpoints saved before it stay, since Orbax deletes
old steps only once a new one is committed.

Restoring walks back from the newest checkpoint to the newest one that reads completely and
whose arrays match the checksums saved with them (jtrain.checkpoint_integrity), so a damaged
file costs one interval. A training run moves the damaged ones aside (jtrain.checkpoint_faults),
so it can save those steps again. A checkpoint of another model is not damaged: it is refused.

A small state is saved packed into a few flat arrays, a large one array by array
(jtrain.checkpoint_layout says which and why); both restore onto any mesh. The data positions
of every process (jtrain.checkpoint_data), config, run metadata, layout and checksums ride in
the step's metadata file, which Orbax writes before the commit rename.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jtrain import checkpoint_data, checkpoint_faults, console, packed_state
from jtrain import checkpoint_layout as layouts
from jtrain.checkpoint_faults import damage, newest_readable, on_every_process
from jtrain.errors import UserError
from jtrain.models.transformer import HEAD_PARAMS
from jtrain.state import TrainState

log = logging.getLogger(__name__)
# gs://, s3://, hf://...: Orbax would take one, but jtrain's own files (metrics, config, the lock)
# are local, and a path so named becomes a local "gs:" folder.
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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


class Checkpoints:
    """The run's CheckpointManager: keeps the last `keep` plus the best by a validation metric
    (`best_metric`, lower is better with best_mode="min", higher with "max"). `layout` forces
    how the state is saved (jtrain.checkpoint_layout; "auto": by its size)."""

    def __init__(
        self,
        workdir: str,
        ckpt_cfg,
        *,
        best_metric: str = "loss",
        best_mode: str = "min",
        read_only: bool = False,
        layout: str = layouts.AUTO,
    ):
        if layout not in layouts.KINDS:
            raise ValueError(f"layout={layout!r} is not one of {', '.join(layouts.KINDS)}")
        self.layout = layout
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.best_metric = best_metric
        self.read_only = read_only
        self._pending: int | None = None  # the step of the save started last
        checkpoint_faults.quiet_orbax_failures()
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
                # In `save`, not in Orbax's threads: there, a directory that cannot be made
                # leaves the other threads waiting for it, and the process never exits.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
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
        layout, tree, finite, sums = layouts.prepared(state, layouts.choose(state, self.layout))
        if not finite:
            log.error("not saving step %d: the state holds non-finite values", step)
            return False
        meta = {
            "step": step,
            "wall_time": time.perf_counter() - started,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "jax_version": jax.__version__,
            "jtrain_version": _jtrain_version(),
        }
        custom = checkpoint_data.gathered(data_state)
        custom |= {"config": dict(config), "meta": meta, "layout": layout, "checksums": sums}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(tree))
        found = metrics is not None and self.best_metric in metrics
        best = {self.best_metric: metrics[self.best_metric]} if found else None
        self.wait()  # the previous save's failure is reported as that step's
        self._pending = step
        try:
            return self.manager.save(
                step, args=args, metrics=best, force=True, custom_metadata=custom
            )
        except Exception as err:  # noqa: BLE001 - any failure to save ends the run, explained
            raise self._failed(err) from err

    def wait(self) -> None:
        """Blocks until every pending save is committed to disk."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - any failure to save ends the run, explained
            raise self._failed(err) from err

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _failed(self, err: Exception) -> CheckpointError:
        return CheckpointError(
            f"could not save checkpoint step {self._pending} in {self.directory}: "
            f"{checkpoint_faults.describe(err)}. The checkpoints saved before it are kept, and "
            "a run started again once this is fixed resumes from the latest."
        )

    # -- restoring --------------------------------------------------------------------------

    def restore_latest(
        self, abstract_state: TrainState, *, step: int | None = None
    ) -> tuple[TrainState, Any, int] | None:
        """(state, data_state, step) from the newest readable checkpoint, or None if none.

        `abstract_state` carries the target shardings, which may differ from those the
        checkpoint was saved with (resharding). Damaged checkpoints are skipped with a warning
        and, unless read-only, moved aside. With `step`, only that checkpoint is read.
        """
        steps = self.steps()
        if step is not None and step not in steps:
            raise CheckpointError(
                f"{self.directory} has no checkpoint of step {step}; it has {steps or 'none'}."
            )
        read = functools.partial(self._read, abstract_state=abstract_state)
        at, restored, damaged = newest_readable(
            self.directory, steps if step is None else [step], read
        )
        if at is None and step is not None:
            raise CheckpointError(
                f"{damage(self.directory, damaged)}; choose another of its steps {steps}."
            )
        if at is None and steps:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be read: "
                f"{damage(self.directory, damaged)}. Nothing was moved (so many failures may "
                "be the reading side's: permissions, a lost mount); move the directory away "
                "to start afresh."
            )
        if at is None:
            return None
        if damaged and not self.read_only:
            self._move_aside(damaged, fell_back_to=at)
        return (*restored, at)

    def _read(self, step: int, abstract_state: TrainState) -> tuple[TrainState, Any]:
        """(state, data_state) of checkpoint `step`: every process reads it, or none does."""
        custom = on_every_process(lambda: layouts.saved_layout(self.manager, step))
        self._check_shapes(step, custom, abstract_state)
        if custom is None:
            return on_every_process(lambda: self._restore_legacy(step, abstract_state))
        arrays = on_every_process(
            lambda: layouts.read_arrays(self.manager, step, custom["layout"], abstract_state)
        )
        state = layouts.restored(arrays, custom, abstract_state)
        return state, checkpoint_data.own(custom, f"checkpoint {self.directory}/{step}")

    def _move_aside(self, damaged: list[tuple[int, str]], *, fell_back_to: int) -> None:
        """Moves damaged checkpoints out of Orbax's directory: left there, the step they
        hold could never be saved again. Process 0 moves; the others wait for it."""
        if jax.process_index() == 0:
            for step, why in damaged:
                try:
                    where = checkpoint_faults.move_aside(
                        self.directory, step, why, fell_back_to=fell_back_to
                    )
                except OSError as err:
                    raise CheckpointError(
                        f"{damage(self.directory, [(step, why)])} and could not be moved "
                        f"aside ({err}); move it out of {self.directory}, then run again."
                    ) from err
                console.status(f"jtrain: moved the damaged checkpoint of step {step} to {where}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("damaged checkpoints moved aside")
        self.manager.reload()

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


def checkpoints_directory(path: str) -> str:
    """The checkpoints/ directory of a jtrain workdir, or `path` itself."""
    if os.path.basename(path.rstrip("/")) == "checkpoints":
        return path
    candidate = os.path.join(path, "checkpoints")
    return candidate if os.path.isdir(candidate) else path


def load_params(
    path: str,
    abstract_params,
    *,
    step: int | None = None,
    config_key: str | None = "model.init_from",
):
    """Parameters only (no optimizer or data state) from a jtrain workdir or checkpoint dir:
    of its newest readable checkpoint (damaged ones passed over with a warning), or of `step`.
    Messages begin with `config_key`=path, the setting that named it (None: nothing)."""
    if URL.match(path):
        raise CheckpointError(
            f"{config_key or 'the checkpoint path'}={path} is a URL, and jtrain reads "
            "checkpoints from local paths only: mount the bucket (e.g. with gcsfuse) and give "
            "the mounted path"
        )
    path = os.path.abspath(os.path.expanduser(path))  # Orbax takes absolute paths only
    prefix = f"{config_key}={path!r}: " if config_key else ""
    directory = checkpoints_directory(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{prefix}no checkpoint directory at {path}")
    checkpoint_faults.quiet_orbax_failures()
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise CheckpointError(f"{prefix}{directory} holds no checkpoint")
        if step is not None and step not in steps:
            raise CheckpointError(
                f"{prefix}{directory} has no checkpoint of step {step}; it has steps {steps}"
            )
        read = functools.partial(_read_params, manager, abstract=abstract_params, prefix=prefix)
        at, params, damaged = newest_readable(directory, steps if step is None else [step], read)
        if at is None:
            what = "choose another of its steps" if step is not None else "none of its steps"
            raise CheckpointError(f"{prefix}{damage(directory, damaged)}; {what} {steps}")
        return params
    finally:
        manager.close()


def _read_params(manager: ocp.CheckpointManager, step: int, *, abstract, prefix: str):
    """The parameters of checkpoint `step`: every process reads them, or none does."""
    custom = on_every_process(lambda: layouts.saved_layout(manager, step))
    if custom is None:
        return on_every_process(lambda: _read_legacy_params(manager, step, abstract, prefix))
    layout, abstract = _trunk_only(custom["layout"], abstract)
    problems = packed_state.layout_problems(layout, abstract, "params/")
    _refuse_mismatch(prefix, manager, step, problems)
    arrays = on_every_process(
        lambda: layouts.read_arrays(manager, step, layout, abstract, "params/")
    )
    return layouts.restored(arrays, {**custom, "layout": layout}, abstract, "params/")


def _read_legacy_params(manager: ocp.CheckpointManager, step: int, abstract, prefix: str):
    saved = manager.item_metadata(step)["state"]["params"]
    _refuse_mismatch(prefix, manager, step, shape_mismatches(saved, abstract))
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={"params": abstract},
                restore_args={"params": restore_args},
                partial_restore=True,
            )
        ),
    )
    return restored["state"]["params"]


def _refuse_mismatch(prefix: str, manager, step: int, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(
            f"{prefix}checkpoint {manager.directory}/{step} does not match the configured "
            "model:\n  " + "\n  ".join(problems[:20])
        )


@functools.cache
def _jtrain_version() -> str:
    try:
        from importlib.metadata import version

        return version("jtrain")
    except Exception:  # noqa: BLE001 - running from a source tree without installing
        return "unknown"
