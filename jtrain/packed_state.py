"""The train state packed into a few flat arrays for saving, and cut back out on restore.

Orbax's cost per save grows with the number of arrays (about 2 ms of CPU each, against 5 ms
for all 10 MB of the default model's data), so a small state (jtrain.checkpoint_layout) is
saved as one flat array per group (the parameters, everything else) and dtype, sharded over
every device of the mesh.
The layout (name, shape, dtype, offset of each leaf) goes in the checkpoint's metadata;
restoring reads the flat arrays onto the target mesh and cuts them back into the target
shardings, so a checkpoint restores onto any mesh and any device count. Packing, the finite
check and the arrays' checksums (jtrain.checkpoint_integrity) are one jitted dispatch,
compiled once per process and state structure.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from jtrain import checkpoint_integrity


def path_name(path) -> str:
    """'params/blocks/attn/q_DxHxK' from a pytree path of a state or of Orbax metadata."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(n for n in names if n != "value")  # nnx's Param wraps arrays in .value


def shapes(tree) -> dict[str, tuple]:
    """{leaf name: shape} of a state, an abstract state or Orbax metadata."""
    return {path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def shape_problems(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
    """One line per leaf whose shape or presence differs between a checkpoint and a model."""
    problems = [
        f"{name}: checkpoint {saved[name]} vs config {expected[name]}"
        for name in sorted(saved.keys() & expected.keys())
        if saved[name] != expected[name]
    ]
    problems += [f"{name}: missing from the checkpoint" for name in sorted(expected - saved.keys())]
    problems += [f"{name}: not in the model" for name in sorted(saved.keys() - expected.keys())]
    return problems


def is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat_sharding(shardings) -> tuple[jax.sharding.Sharding, int]:
    """A 1-D array split over every device of the state's mesh, and that device count."""
    for s in shardings:
        if isinstance(s, NamedSharding):
            return NamedSharding(s.mesh, PartitionSpec(tuple(s.mesh.axis_names))), s.mesh.size
    return shardings[0], 1


def layout_of(state) -> dict:
    """Where each leaf of `state` lies in the packed arrays: {"leaves": [...], "sizes": {...}}."""
    leaves, sizes = [], {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        name = path_name(path)
        data = jax.eval_shape(jax.random.key_data, x) if is_key(x) else x
        group = f"{'params' if name.startswith('params/') else 'rest'}/{data.dtype.name}"
        size = math.prod(data.shape)
        entry = {"name": name, "shape": list(x.shape), "dtype": str(x.dtype), "group": group}
        entry |= {"offset": sizes.get(group, 0), "size": size}
        if is_key(x):
            entry["impl"] = str(jax.random.key_impl(x))
        leaves.append(entry)
        sizes[group] = sizes.get(group, 0) + size
    return {"kind": "packed", "leaves": leaves, "sizes": sizes}


def _padded(size: int, devices: int) -> int:
    return -(-size // devices) * devices


def nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{"params/float32": x} -> {"params": {"float32": x}}: Orbax joins nested keys itself."""
    out: dict[str, dict[str, Any]] = {}
    for group, x in flat.items():
        section, dtype = group.split("/")
        out.setdefault(section, {})[dtype] = x
    return out


def _packer(layout: dict, shardings):
    """A jitted state -> ({group: flat array}, all finite, {group: checksum}), in one
    dispatch."""
    flat_sharding, devices = _flat_sharding(shardings)
    groups = list(layout["sizes"])

    def pack(state):
        parts: dict[str, list] = {g: [] for g in groups}
        finite = []
        for entry, x in zip(layout["leaves"], jax.tree.leaves(state), strict=True):
            if is_key(x):
                x = jax.random.key_data(x)
            elif jnp.issubdtype(x.dtype, jnp.floating):
                finite.append(jnp.all(jnp.isfinite(x)))
            parts[entry["group"]].append(x.ravel())
        for g, size in layout["sizes"].items():
            parts[g].append(jnp.zeros(_padded(size, devices) - size, parts[g][0].dtype))
        packed = {g: jnp.concatenate(xs) for g, xs in parts.items()}
        all_finite = jnp.all(jnp.stack(finite)) if finite else jnp.array(True)
        return packed, all_finite, checkpoint_integrity.checksums(packed)

    return jax.jit(pack, out_shardings=({g: flat_sharding for g in groups}, None, None))


# Compiled once per process and state structure, so a new Checkpoints compiles nothing.
_PACKERS: dict = {}
_UNPACKERS: dict = {}


def built_once(cache: dict, state, layout_fn, build):
    """(layout_fn(state), build(layout, leaves)) for states shaped and sharded like `state`,
    from `cache` when it has them: a save's jitted programs compile once per structure."""
    leaves, treedef = jax.tree.flatten(state)
    key = (treedef, tuple((x.shape, x.dtype, x.sharding) for x in leaves))
    if key not in cache:
        if len(cache) >= 8:  # tests build many small models; a run builds one
            cache.clear()
        layout = layout_fn(state)
        cache[key] = layout, build(layout, leaves)
    return cache[key]


def packer_for(state):
    """(layout, jitted pack) for states shaped and sharded like `state`, built once."""
    return built_once(
        _PACKERS,
        state,
        layout_of,
        lambda layout, leaves: _packer(layout, [x.sharding for x in leaves]),
    )


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


def layout_problems(layout: dict, abstract_tree, prefix: str) -> list[str]:
    """Shape differences between a packed checkpoint and `abstract_tree`, parameters first."""
    saved = {e["name"]: tuple(e["shape"]) for e in layout["leaves"] if e["name"].startswith(prefix)}
    expected = {prefix + name: shape for name, shape in shapes(abstract_tree).items()}

    def params(shapes):
        return {k: v for k, v in shapes.items() if k.startswith("params/")}

    return shape_problems(params(saved), params(expected)) or shape_problems(saved, expected)


def wanted(layout: dict, abstract_tree, prefix: str):
    """(layout entries, abstract leaves, treedef) of the leaves of `abstract_tree`."""
    by_name = {e["name"]: e for e in layout["leaves"]}
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)
    return [by_name[prefix + path_name(p)] for p, _ in paths], [a for _, a in paths], treedef


def read(manager, step: int, layout: dict, abstract_tree, prefix: str = "") -> dict:
    """{group: flat array} of the groups holding the leaves of `abstract_tree` (named
    `prefix` + path), read from a packed checkpoint onto the devices of its shardings."""
    entries, abstract_leaves, _ = wanted(layout, abstract_tree, prefix)
    sharding, devices = _flat_sharding([a.sharding for a in abstract_leaves])
    items, args = {}, {}
    for group in sorted({e["group"] for e in entries}):
        shape = (_padded(layout["sizes"][group], devices),)
        dtype = jnp.dtype(group.split("/")[1])
        items[group] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        # strict=False: another device count pads the flat array to another length.
        args[group] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, strict=False)
    restore = ocp.args.PyTreeRestore(
        item=nest(items), restore_args=nest(args), partial_restore=True
    )
    restored = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
    return {f"{s}/{d}": x for s, xs in restored.items() for d, x in xs.items()}


def unpack(packed: dict, layout: dict, abstract_tree, prefix: str = ""):
    """The leaves of `abstract_tree` (named `prefix` + path) cut from `read`'s arrays."""
    entries, abstract_leaves, treedef = wanted(layout, abstract_tree, prefix)
    return jax.tree.unflatten(treedef, _unpack(packed, entries, abstract_leaves))
