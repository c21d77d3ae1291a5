"""The train state saved array by array: each leaf as it lies on the devices, nothing copied.

For a large state, packing it (jtrain.packed_state) would hold a second copy of it on the
devices and reshuffle it across them at every save. Saved per array instead, Orbax writes
each array's shards from the devices that hold them, and the checkpoint's "state" item is a
plain Orbax PyTree, a nested dict by leaf name ("params/blocks/attn/q_DxHxK" is
state["params"]["blocks"]["attn"]["q_DxHxK"]) that `ocp.StandardCheckpointer` reads without
jtrain. PRNG keys are saved as their key data (uint32). The finite check and one checksum per
array (jtrain.checkpoint_integrity) are one jitted dispatch that writes nothing but scalars.
The layout (name, shape, dtype of each leaf) goes in the step's metadata, and restoring reads
each array straight into its target sharding, so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jtrain import checkpoint_integrity
from jtrain.packed_state import built_once, is_key, path_name, wanted

KIND = "arrays"


def layout_of(state) -> dict:
    """{"kind": "arrays", "leaves": [{"name", "shape", "dtype"[, "impl"]}, ...]}."""
    leaves = []
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        entry = {"name": path_name(path), "shape": list(x.shape), "dtype": str(x.dtype)}
        if is_key(x):
            entry["impl"] = str(jax.random.key_impl(x))
        leaves.append(entry)
    return {"kind": KIND, "leaves": leaves}


def _set(tree: dict, name: str, value) -> None:
    *parents, last = name.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _get(tree: dict, name: str):
    for part in name.split("/"):
        tree = tree[part]
    return tree


def saved_tree(state) -> dict[str, Any]:
    """The nested dict Orbax saves: the state's own arrays (keys as their key data)."""
    out: dict[str, Any] = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        _set(out, path_name(path), jax.random.key_data(x) if is_key(x) else x)
    return out


def _checker(layout: dict):
    """A jitted state -> (all finite, {leaf name: checksum}): scalars out, no copy."""

    def check(state):
        finite, arrays = [], {}
        for entry, x in zip(layout["leaves"], jax.tree.leaves(state), strict=True):
            if is_key(x):
                x = jax.random.key_data(x)
            elif jnp.issubdtype(x.dtype, jnp.floating):
                finite.append(jnp.all(jnp.isfinite(x)))
            arrays[entry["name"]] = x
        all_finite = jnp.all(jnp.stack(finite)) if finite else jnp.array(True)
        return all_finite, checkpoint_integrity.checksums(arrays)

    return jax.jit(check)


_CHECKERS: dict = {}  # compiled once per process and state structure


def checker_for(state):
    """(layout, jitted check) for states shaped and sharded like `state`, built once."""
    return built_once(_CHECKERS, state, layout_of, lambda layout, leaves: _checker(layout))


def read(manager, step: int, layout: dict, abstract_tree, prefix: str = "") -> dict:
    """{leaf name: array as saved} of the leaves of `abstract_tree` (named `prefix` + path),
    each read straight into the sharding of its abstract leaf."""
    entries, abstract_leaves, _ = wanted(layout, abstract_tree, prefix)
    items: dict = {}
    args: dict = {}
    for entry, a in zip(entries, abstract_leaves, strict=True):
        shape = tuple(entry["shape"])
        dtype = jnp.dtype(entry["dtype"]) if "impl" not in entry else jnp.dtype("uint32")
        if "impl" in entry:  # key data: the key's shape plus the implementation's words
            shape = jax.eval_shape(jax.random.key_data, a).shape
        _set(items, entry["name"], jax.ShapeDtypeStruct(shape, dtype, sharding=a.sharding))
        _set(args, entry["name"], ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=dtype))
    restore = ocp.args.PyTreeRestore(item=items, restore_args=args, partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
    return {e["name"]: _get(restored, e["name"]) for e in entries}


def unpack(arrays: dict, layout: dict, abstract_tree, prefix: str = ""):
    """`abstract_tree` filled from `read`'s arrays: keys rewrapped, dtypes as the model's."""
    entries, abstract_leaves, treedef = wanted(layout, abstract_tree, prefix)
    out = []
    for entry, a in zip(entries, abstract_leaves, strict=True):
        x = arrays[entry["name"]]
        if "impl" in entry:
            x = jax.random.wrap_key_data(x, impl=entry["impl"])
        elif x.dtype != a.dtype:
            x = x.astype(a.dtype)
        out.append(x)
    return jax.tree.unflatten(treedef, out)
