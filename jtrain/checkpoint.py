"""Orbax checkpoints of a run: train state, data-iterator position, config and metadata.

Saves are asynchronous (the device-to-host copy is the only blocking part) and atomic
(Orbax writes into a temporary directory and renames it when complete), so a kill at any
moment leaves the previous checkpoints intact. Restoring walks back from the newest
checkpoint to the newest one that reads completely, so a damaged file costs one interval.

Orbax's cost per save grows with the number of arrays (about 2 ms of CPU each, against
5 ms for all 10 MB of the default model's data), so the state is saved packed: one flat
array per group (the parameters, everything else) and dtype, sharded over every device,
with a layout (name, shape, dtype, offset of each leaf) in the step's metadata. Restoring
reads the flat arrays onto the target mesh and cuts them back into the target shardings,
so a checkpoint restores onto any mesh. The data position, config and run metadata ride
in the same step metadata file, which Orbax writes before the commit rename anyway.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers as policies

from jtrain.state import TrainState

log = logging.getLogger(__name__)

# Keys whose change makes an existing checkpoint belong to a different run. Mesh, eval,
# logging and train.steps may change on resume (resharding, extending a run).
IDENTITY_KEYS = ("seed", "task", "model", "data", "optimizer.name", "train.batch_size")
PACKED = "arrays"  # the packed state's item; checkpoints from before packing hold "state"


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
        # A key the saved config lacks was added to jtrain after that run was written: the
        # run behaved as its default does, so only keys both configs hold are compared.
        for name in sorted(old.keys() & new.keys() if old else new.keys()):
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

    return _shape_problems(_shapes(saved_tree), _shapes(expected_tree))


def _shapes(tree) -> dict[str, tuple]:
    return {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _shape_problems(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
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


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat_sharding(shardings) -> tuple[jax.sharding.Sharding, int]:
    """A 1-D array split over every device of the state's mesh, and that device count."""
    for s in shardings:
        if isinstance(s, NamedSharding):
            return NamedSharding(s.mesh, PartitionSpec(tuple(s.mesh.axis_names))), s.mesh.size
    return shardings[0], 1


def _layout(state) -> dict:
    """Where each leaf of `state` lies in the packed arrays: {"leaves": [...], "sizes": {...}}."""
    leaves, sizes = [], {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        name = _path_name(path)
        data = jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x
        group = f"{'params' if name.startswith('params/') else 'rest'}/{data.dtype.name}"
        size = math.prod(data.shape)
        entry = {"name": name, "shape": list(x.shape), "dtype": str(x.dtype), "group": group}
        entry |= {"offset": sizes.get(group, 0), "size": size}
        if _is_key(x):
            entry["impl"] = str(jax.random.key_impl(x))
        leaves.append(entry)
        sizes[group] = sizes.get(group, 0) + size
    return {"leaves": leaves, "sizes": sizes}


def _padded(size: int, devices: int) -> int:
    return -(-size // devices) * devices


def _nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{"params/float32": x} -> {"params": {"float32": x}}: Orbax joins nested keys itself."""
    out: dict[str, dict[str, Any]] = {}
    for group, x in flat.items():
        section, dtype = group.split("/")
        out.setdefault(section, {})[dtype] = x
    return out


def _packer(layout: dict, shardings):
    """A jitted state -> ({group: flat array}, all finite), in one dispatch."""
    flat_sharding, devices = _flat_sharding(shardings)
    groups = list(layout["sizes"])

    def pack(state):
        parts: dict[str, list] = {g: [] for g in groups}
        finite = []
        for entry, x in zip(layout["leaves"], jax.tree.leaves(state), strict=True):
            if _is_key(x):
                x = jax.random.key_data(x)
            elif jnp.issubdtype(x.dtype, jnp.floating):
                finite.append(jnp.all(jnp.isfinite(x)))
            parts[entry["group"]].append(x.ravel())
        for g, size in layout["sizes"].items():
            parts[g].append(jnp.zeros(_padded(size, devices) - size, parts[g][0].dtype))
        packed = {g: jnp.concatenate(xs) for g, xs in parts.items()}
        return packed, jnp.all(jnp.stack(finite)) if finite else jnp.array(True)

    return jax.jit(pack, out_shardings=({g: flat_sharding for g in groups}, None))


# Compiled once per process and state structure, so a new Checkpoints compiles nothing.
_PACKERS: dict = {}
_UNPACKERS: dict = {}


def _cached_packer(state):
    """(layout, jitted pack) for states shaped and sharded like `state`, built once."""
    leaves, treedef = jax.tree.flatten(state)
    key = (treedef, tuple((x.shape, x.dtype, x.sharding) for x in leaves))
    if key not in _PACKERS:
        if len(_PACKERS) >= 8:  # tests build many small models; a run builds one
            _PACKERS.clear()
        layout = _layout(state)
        _PACKERS[key] = layout, _packer(layout, [x.sharding for x in leaves])
    return _PACKERS[key]


def _unpack(packed: dict, entries: list[dict], abstract_leaves: list):
    """The leaves `entries` describe, cut from `packed` into the abstract leaves' shardings."""
    shardings = tuple(a.sharding for a in abstract_leaves)
    key = (json.dumps(entries), tuple((a.shape, a.dtype) for a in abstract_leaves), shardings)
    if key not in _UNPACKERS:

        def unpack(packed):
            out = []
            for entry, a in zip(entries, abstract_leaves, strict=True):
                x = packed[entry["group"]][entry["offset"] : entry["offset"] + entry["size"]]
                if "impl" in entry:
                    x = jax.random.wrap_key_data(x.reshape(*a.shape, -1), impl=entry["impl"])
                else:
                    x = x.reshape(a.shape).astype(a.dtype)
                out.append(x)
            return out

        if len(_UNPACKERS) >= 8:
            _UNPACKERS.clear()
        _UNPACKERS[key] = jax.jit(unpack, out_shardings=list(shardings))
    return _UNPACKERS[key](packed)


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


def _layout_problems(layout: dict, abstract_tree, prefix: str) -> list[str]:
    """Shape differences between a packed checkpoint and `abstract_tree`, parameters first."""
    saved = {e["name"]: tuple(e["shape"]) for e in layout["leaves"] if e["name"].startswith(prefix)}
    expected = {prefix + name: shape for name, shape in _shapes(abstract_tree).items()}

    def params(shapes):
        return {k: v for k, v in shapes.items() if k.startswith("params/")}

    return _shape_problems(params(saved), params(expected)) or _shape_problems(saved, expected)


def _restore_packed(manager, step: int, layout: dict, abstract_tree, prefix: str = ""):
    """The leaves of `abstract_tree` (named `prefix` + path) from a packed checkpoint."""
    by_name = {e["name"]: e for e in layout["leaves"]}
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)
    entries = [by_name[prefix + _path_name(p)] for p, _ in paths]
    abstract_leaves = [a for _, a in paths]
    sharding, devices = _flat_sharding([a.sharding for a in abstract_leaves])
    items, args = {}, {}
    for group in sorted({e["group"] for e in entries}):
        shape = (_padded(layout["sizes"][group], devices),)
        dtype = jnp.dtype(group.split("/")[1])
        items[group] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        # strict=False: another device count pads the flat array to another length.
        args[group] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, strict=False)
    restore = ocp.args.PyTreeRestore(
        item=_nest(items), restore_args=_nest(args), partial_restore=True
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
    packed = {f"{s}/{d}": x for s, xs in restored.items() for d, x in xs.items()}
    return jax.tree.unflatten(treedef, _unpack(packed, entries, abstract_leaves))


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
        layout, pack = _cached_packer(state)
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
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(_nest(packed)))
        best = {self.best_metric: metrics[self.best_metric]} if metrics else None
        return self.manager.save(step, args=args, metrics=best, force=True, custom_metadata=custom)

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
            try:
                custom = _saved_layout(self.manager, step)
                self._check_shapes(step, custom, abstract_state)
                if custom is None:
                    state, data_state = self._restore_legacy(step, abstract_state)
                else:
                    state = _restore_packed(self.manager, step, custom["layout"], abstract_state)
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
            problems = _layout_problems(custom["layout"], abstract_state, "")
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
    try:
        custom = _saved_layout(manager, step)
    except ValueError as err:
        raise CheckpointError(f"model.init_from={path!r}: {err}") from None
    if custom is not None:
        problems = _layout_problems(custom["layout"], abstract_params, "params/")
    else:
        problems = shape_mismatches(manager.item_metadata(step)["state"]["params"], abstract_params)
    if problems:
        raise CheckpointError(
            f"model.init_from={path!r} (step {step}) does not match the configured model:\n  "
            + "\n  ".join(problems[:20])
        )
    try:
        if custom is not None:
            return _restore_packed(manager, step, custom["layout"], abstract_params, "params/")
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
