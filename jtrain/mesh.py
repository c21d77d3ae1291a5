"""The device mesh and the shardings derived from logical axis names.

Parameters are created with logical names ("embed", "mlp", ...); `config.mesh.rules` maps
each name to mesh axes. Every sharding in a run is derived here from those two facts, so a
new parameter or mesh layout never needs a hand-written sharding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jtrain.validation import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
Rules = dict[str, tuple[str, ...]]


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolves the (data, fsdp, tensor) sizes, filling in the one that is -1."""
    sizes = [int(mesh_cfg[name]) for name in MESH_AXES]
    asked = dict(zip(MESH_AXES, sizes, strict=True))
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(
            f"mesh sizes {asked} are invalid: each must be a positive integer"
            ", and at most one may be -1 (all remaining devices)."
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh {asked}: the fixed axes ({known} devices) do not "
                f"divide the {num_devices} available devices."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one of mesh.data/fsdp/tensor to -1 to fill the rest."
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices, or over the given ones."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: XLA's sharding propagation places intermediates; we pin inputs and outputs.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def parse_rules(rules_cfg: Mapping[str, str]) -> Rules:
    """{"batch": "data,fsdp", "head_dim": ""} -> {"batch": ("data", "fsdp"), "head_dim": ()}."""
    rules = {}
    for logical, value in rules_cfg.items():
        axes = tuple(a.strip() for a in str(value).split(",") if a.strip())
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(
                f"config.mesh.rules.{logical}={value!r} is invalid: unknown mesh axes {unknown}; "
                f"allowed: {', '.join(MESH_AXES)} (comma-separated) or '' for replicated."
            )
        rules[logical] = axes
    return rules


def logical_to_mesh(logical: PartitionSpec, rules: Rules) -> PartitionSpec:
    """Maps a PartitionSpec of logical names to one of mesh axes; unnamed dims replicate."""
    out = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(
                f"no mesh rule for logical axis {name!r}; add mesh.rules.{name} to the config "
                "(a mesh axis name, several comma-separated, or '' to replicate)."
            )
        axes = rules[name]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _check_divisible(path, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, axes in zip(shape, spec, strict=False):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else axes
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            raise ValueError(
                f"{jax.tree_util.keystr(path)} has shape {shape}; its dimension {dim} is "
                f"sharded over mesh axes {names} of total size {size}, which does not divide it. "
                "Change the model size, the mesh sizes, or mesh.rules."
            )


def tree_shardings(abstract_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for a pytree whose nnx.Variable leaves carry logical axis names.

    Works for params and for optimizer state alike: optax keeps the Param wrappers (and
    so the names) on moments, while scalars such as step counts are replicated.
    """
    logical = nnx.get_partition_spec(abstract_tree)
    specs = jax.tree.map(lambda p: logical_to_mesh(p, rules), logical)

    def checked(path, spec, leaf):
        _check_divisible(path, tuple(leaf.shape), spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(checked, specs, abstract_tree)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of [batch, ...] input arrays: the batch dim over rules["batch"]."""
    return NamedSharding(mesh, logical_to_mesh(PartitionSpec("batch"), rules))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in rules.get("batch", ()))


def to_global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding):
    """Assembles each process's local rows into global arrays with the batch sharding."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
