"""Ahead-of-time compilation of a config's real train step for a TPU topology, on any host.

With `libtpu` installed, JAX describes a TPU topology (`v5e:2x2`, `v5p:4x4x8`, several
slices) as compile-only devices: jtrain builds its Experiment (mesh, shardings, jitted step)
over those devices, lowers the step with an abstract sharded state and batch, and lets XLA's
TPU compiler compile it. What comes back is XLA's own account of the program each chip would
run: its memory by kind, and the FLOPs it executes. Nothing is allocated and no TPU is needed;
the process's own backend (the CPU) stays the default for everything else.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import math
import multiprocessing
import os
import re
import time

import jax
import jax.numpy as jnp
from jax.extend import core

from jtrain import checkpoint_layout, tasks
from jtrain import mesh as mesh_lib
from jtrain.errors import UserError
from jtrain.experiment import Experiment

# The libtpu release this jax was checked with (jax 0.10.2); others may not load.
LIBTPU_PIN = "libtpu==0.0.52"
_TOPOLOGY = re.compile(r"^v\d+[a-z]*:\d+(x\d+){1,2}$")


class AotUnavailable(UserError):
    """Compiling for a TPU topology is not possible in this environment (no libtpu)."""


class TopologyError(UserError, ValueError):
    """A topology name libtpu cannot build."""


def check_available(topology: str) -> None:
    """TopologyError for a malformed topology name, AotUnavailable without libtpu: what can be
    told before libtpu loads."""
    if not _TOPOLOGY.match(topology):
        raise TopologyError(
            f"topology {topology!r} is not of the form GENERATION:SHAPE: use e.g. v5e:2x2, "
            "v5p:4x4x8, v6e:8x8 (chips along each axis)."
        )
    if importlib.util.find_spec("libtpu") is None:
        raise AotUnavailable(
            f"compiling for TPU topology {topology} on this host needs libtpu, which is not "
            f'installed: pip install {LIBTPU_PIN} (or pip install "jtrain[test]"; about 140 MB).'
        )


def in_child(fn, *args):
    """fn(*args) in a fresh (spawned) process, its result or exception returned here.

    Loading libtpu changes a process for good: it registers a compile-only TPU client, which
    jax.profiler then crashes on, and prints host-probe warnings. So the TPU compiles run
    in a child, and the caller's process stays as it was."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def topology_devices(topology: str, slices: int = 1) -> list[jax.Device]:
    """The compile-only devices of `slices` slices of `topology` ("v5e:2x2", "v5p:4x4x8"),
    loaded into this process (compile_report does it in a child)."""
    check_available(topology)
    _quiet_host_probes()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology, "tpu", num_slices=slices)
    except (RuntimeError, ValueError) as err:  # JaxRuntimeError is a RuntimeError
        message = str(err).splitlines()[0]
        if "TPU" in message and "not installed" in message:
            raise AotUnavailable(
                f"libtpu did not load: {message}; pip install {LIBTPU_PIN}"
            ) from None
        raise TopologyError(
            f"libtpu cannot build topology {topology!r} ({message}): use e.g. v5e:2x2, "
            "v5p:4x4x8, v6e:8x8."
        ) from None
    return list(desc.devices)


def _quiet_host_probes() -> None:
    """Off a TPU host, libtpu looks for the TPU VM's metadata server and its workers'
    addresses, and takes a machine-wide lock (/tmp/libtpu_lockfile) meant to keep two
    processes off one TPU: tell it there are none, and that compile-only users may share
    (another JAX process started without JAX_PLATFORMS holds that lock). On a TPU VM the
    real values stay."""
    if jax.default_backend() != "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def abstract_batch(config, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the data pipeline feeds the task, as shapes on `sharding`."""
    shapes = tasks.get(config).batch_shapes()
    if shapes is None:
        raise UserError(
            f"compiling ahead of time needs the shapes of a task's batches without its data; "
            f"task={config.task!r} does not give them (Task.batch_shapes): compile it on its "
            "own hardware."
        )
    return {
        key: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
        for key, (shape, dtype) in shapes.items()
    }


def matmul_flops(jaxpr: core.Jaxpr) -> float:
    """FLOPs of every matrix product a program runs, loops counted by their trip counts.

    XLA's cost analysis counts a loop's body once, and jtrain scans its layers, so for the
    FLOPs a step executes the traced program is counted instead: the same products XLA
    compiles (rematerialised ones included), each 2 x output size x contracted size.
    """
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = math.prod(eqn.outvars[0].aval.shape)
            total += 2.0 * out * math.prod(lhs[d] for d in contracting)
        inner = [matmul_flops(j) for j in core.jaxprs_in_params(eqn.params)]
        if eqn.primitive.name == "cond":  # one branch runs
            total += max(inner, default=0.0)
        else:
            runs = eqn.params["length"] if eqn.primitive.name == "scan" else 1
            total += runs * sum(inner)
    return total


def _memory(compiled) -> dict[str, int]:
    """XLA's per-device memory of a compiled program, by kind, and their peak sum."""
    m = compiled.memory_analysis()
    out = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),  # outputs written over donated arguments
        "temporaries": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def _save_path(state) -> dict:
    """The checkpoint save's device side, compiled: the program jtrain.checkpoint runs for
    this state (packing into flat arrays for a small state; checks and checksums of each
    array in place for a large one)."""
    kind, program = checkpoint_layout.save_program(state)
    start = time.perf_counter()
    compiled = program.lower(state).compile()
    return {
        "layout": kind,
        "memory_per_device_bytes": _memory(compiled),
        "compile_s": time.perf_counter() - start,
    }


def compile_report(config, topology: str, *, save_path: bool = True) -> dict:
    """Compiles `config`'s train step (and, with save_path, the checkpoint save's device side)
    for a TPU topology; returns XLA's per-device memory, the step's FLOPs and the compile time.

    The slices compiled for are the product of mesh.dcn_* (one unless the config is
    multislice); the mesh sizes fill each slice as on the real hardware. A step that does
    not fit the chip's memory comes back with "fits": False and XLA's figures from its error.
    The compiling happens in a child process (`in_child`).
    """
    check_available(topology)
    return in_child(compile_report_here, config, topology, save_path)


def compile_report_here(config, topology: str, save_path: bool = True) -> dict:
    """compile_report in this process (libtpu loads into it)."""
    slices = math.prod(mesh_lib.dcn_shape(config.mesh))
    devices = topology_devices(topology, slices)
    exp = Experiment.from_config(config, devices)
    state = exp.abstract_sharded_state()
    batch = abstract_batch(config, exp.batch_sharding)
    start = time.perf_counter()
    traced = exp.train_step.trace(state, batch)
    flops = matmul_flops(traced.jaxpr.jaxpr)
    report = {
        "topology": topology,
        "slices": slices,
        "chips": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(exp.mesh.shape),
        "params": exp.param_count(),
        "flops_per_step": flops,
        "flops_per_device": flops / len(devices),
        # The task's own count (what MFU is computed from), for comparison.
        "model_flops_per_step": exp.task.flops_per_example() * config.train.batch_size,
    }
    try:
        compiled = traced.lower().compile()
    except jax.errors.JaxRuntimeError as err:
        oom = _out_of_memory(str(err), _shard_bytes((state, batch)))
        if oom is None:
            raise
        return {**report, **oom, "compile_s": time.perf_counter() - start}
    report["compile_s"] = time.perf_counter() - start
    report["memory_per_device_bytes"] = _memory(compiled)
    report["fits"] = True
    # XLA's cost analysis, a loop body (the scanned layers) counted once: not the step's.
    report["xla_cost_flops_per_device"] = float((compiled.cost_analysis() or {}).get("flops", 0))
    if save_path:
        report["save"] = _save_path(state)
    return report


_HBM_OOM = re.compile(
    r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"
)


def _out_of_memory(message: str, argument_bytes: int) -> dict | None:
    """XLA's figures from a compile that ran out of device memory; None for other errors."""
    found = _HBM_OOM.search(message)
    if "RESOURCE_EXHAUSTED" not in message or found is None:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    temporaries = int(float(found[1]) * scale[found[2]])
    memory = {"arguments": argument_bytes, "outputs": 0, "aliased": 0, "code": 0}
    memory |= {"temporaries": temporaries, "total": argument_bytes + temporaries}
    return {
        "fits": False,
        "hbm_bytes": int(float(found[3]) * scale[found[4]]),
        "memory_per_device_bytes": memory,
        "compile_error": message.strip().splitlines()[0],
    }


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded shapes (the largest shard of each)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        else 8
        for x in jax.tree.leaves(tree)
    )
