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
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jtrain.validation import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Across slices (multislice TPU): how many slices each axis spans, over the data-centre network.
DCN_KEYS = ("dcn_data", "dcn_fsdp", "dcn_tensor")
Rules = dict[str, tuple[str, ...]]


def dcn_shape(mesh_cfg) -> tuple[int, ...]:
    """The (data, fsdp, tensor) factors across slices (mesh.dcn_*; 1 where a config lacks them)."""
    sizes = {key: mesh_cfg.get(key, 1) for key in DCN_KEYS}
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ConfigError(
            f"mesh {bad} is invalid: the mesh.dcn_* sizes are positive integers "
            "(the slices each axis spans; 1 = within one slice)."
        )
    return tuple(sizes.values())


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """The full (data, fsdp, tensor) sizes: each slice's sizes (-1 filled) times mesh.dcn_*."""
    dcn = dcn_shape(mesh_cfg)
    slices = math.prod(dcn)
    if num_devices % slices:
        raise ConfigError(
            f"mesh.dcn_* ask for {slices} slices, which do not divide the {num_devices} devices; "
            "their product must be the number of slices."
        )
    ici = _slice_shape(mesh_cfg, num_devices // slices, slices)
    return tuple(i * d for i, d in zip(ici, dcn, strict=True))


def _slice_shape(mesh_cfg, num_devices: int, slices: int) -> tuple[int, ...]:
    """Resolves the (data, fsdp, tensor) sizes within a slice, filling in the one that is -1."""
    sizes = [int(mesh_cfg[name]) for name in MESH_AXES]
    asked = dict(zip(MESH_AXES, sizes, strict=True))
    # Within a slice when there are several: the -1 fills, and the sizes multiply to, a slice.
    have = f"{num_devices} are available" + (f" in each of {slices} slices" if slices > 1 else "")
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(
            f"mesh sizes {asked} are invalid: each must be a positive integer"
            ", and at most one may be -1 (all remaining devices)."
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh {asked}: the fixed axes ({known} devices) do not divide the "
                f"{num_devices} devices ({have})."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices "
            f"but {have}; set one of mesh.data/fsdp/tensor to -1 to fill the rest."
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices, or over the given ones; with mesh.dcn_*
    above 1, a hybrid mesh: each slice's (ICI) mesh repeated across slices over the DCN."""
    devices = list(jax.devices() if devices is None else devices)
    # Auto axes: XLA's sharding propagation places intermediates; we pin inputs and outputs.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    dcn = dcn_shape(mesh_cfg)
    if math.prod(dcn) == 1:
        shape = mesh_shape(mesh_cfg, len(devices))
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    slices = _slice_count(devices, dcn)
    ici = _slice_shape(mesh_cfg, len(devices) // slices, slices)
    # The slow DCN factor goes outside the fast ICI one on every axis, so an axis that spans
    # slices crosses the DCN only between its outer groups; the axis names stay the same, so
    # mesh.rules and every sharding built from them hold unchanged.
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _slice_count(devices: Sequence[jax.Device], dcn: tuple[int, ...]) -> int:
    """The number of slices the devices form, which must be the product of mesh.dcn_*."""
    asked = dict(zip(DCN_KEYS, dcn, strict=True))
    ids = {getattr(d, "slice_index", None) for d in devices}
    if None in ids:
        raise ConfigError(
            f"mesh {asked} asks for {math.prod(dcn)} slices, but these devices "
            f"({devices[0].platform}) have no slice index: multislice needs TPU slices; "
            "set mesh.dcn_data, mesh.dcn_fsdp and mesh.dcn_tensor to 1 here."
        )
    if len(ids) != math.prod(dcn):
        raise ConfigError(
            f"mesh {asked} asks for {math.prod(dcn)} slices, but the devices form {len(ids)}: "
            "make the product of mesh.dcn_data, mesh.dcn_fsdp and mesh.dcn_tensor the number "
            "of slices."
        )
    return len(ids)


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
