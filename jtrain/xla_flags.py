"""The XLA flags jtrain sets for a run on NVIDIA GPUs, and when it sets them.

XLA reads the XLA_FLAGS environment variable once, when jax starts its backend, so every
jtrain command calls `apply` first (jtrain.cli.run), before anything touches a device. The
flags are those MaxText and NVIDIA's JAX-Toolbox set for LLM training throughput, less the ones
that are XLA's defaults by now (pipelined reduce-scatter, the high-priority collective stream)
or that trade memory or failure modes for speed (combine thresholds, disabling XLA's own
rematerialisation). They overlap the collectives of a sharded step with its compute: on one GPU
there are none, and the flags change nothing there. A flag the user already set in XLA_FLAGS
is left as they set it; JTRAIN_XLA_GPU_FLAGS=0 turns them all off.

XLA stops the process at backend start for a flag it does not know, and flags are renamed
and removed between versions: tests/test_xla_flags.py starts a backend with all of them.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
from collections.abc import MutableMapping

from jtrain.errors import UserError

SWITCH = "JTRAIN_XLA_GPU_FLAGS"

# Flag -> why it is set.
GPU_FLAGS = {
    # The scheduler that issues collectives (and host copies) asynchronously and orders the
    # compute around them; the pipelining flags below rely on it. Off by default in XLA.
    "--xla_gpu_enable_latency_hiding_scheduler=true": "overlaps collectives with compute",
    # jtrain scans its blocks: with FSDP, the all-gather of block i+1's weights starts while
    # block i computes instead of in front of it.
    "--xla_gpu_enable_pipelined_all_gather=true": "prefetches the next block's weights (FSDP)",
    # Data parallelism: a block's gradient all-reduce runs during the next block's backward.
    "--xla_gpu_enable_pipelined_all_reduce=true": "overlaps gradient all-reduces (data parallel)",
    # Unrolls the layer scan by two so that the pipelined collectives of one iteration run
    # during the other's compute without copying buffers between iterations.
    "--xla_gpu_enable_while_loop_double_buffering=true": "lets the scan overlap them",
}

_CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
_OFF, _ON = ("0", "false", "off", "no"), ("", "1", "true", "on", "yes")


def flag_names(xla_flags: str) -> set[str]:
    """The names of the flags an XLA_FLAGS value sets (`--name=value` or `--name`)."""
    try:
        tokens = shlex.split(xla_flags)
    except ValueError:  # an unbalanced quote: XLA will say so itself
        tokens = xla_flags.split()
    return {token.lstrip("-").split("=", 1)[0] for token in tokens if token.startswith("-")}


def merged(xla_flags: str, flags: list[str]) -> str:
    """`xla_flags` with each of `flags` whose name it does not already set added in front."""
    taken = flag_names(xla_flags)
    added = [flag for flag in flags if flag_names(flag).isdisjoint(taken)]
    return " ".join([*added, xla_flags]).strip()


def enabled(environ: MutableMapping[str, str]) -> bool:
    """Whether JTRAIN_XLA_GPU_FLAGS leaves jtrain's GPU flags on (unset: on)."""
    value = environ.get(SWITCH, "").strip().lower()
    if value not in _OFF + _ON:
        raise UserError(f"{SWITCH}={environ[SWITCH]!r} is invalid: use 1 (the default) or 0")
    return value not in _OFF


def uses_nvidia_gpu(environ: MutableMapping[str, str]) -> bool:
    """Whether jax will start on an NVIDIA GPU, judged without starting a backend: its CUDA
    plugin is installed, JAX_PLATFORMS does not leave CUDA out, and some GPU is visible."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").lower().split(",")]
    if platforms != [""] and not {"cuda", "gpu"} & set(platforms):
        return False
    if environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(_installed(name) for name in _CUDA_PLUGINS)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def apply(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Adds jtrain's GPU flags to XLA_FLAGS for a run on NVIDIA GPUs; returns those added.

    Call it before jax starts a backend: XLA reads the variable only then."""
    environ = os.environ if environ is None else environ
    if not enabled(environ) or not uses_nvidia_gpu(environ):
        return []
    before = environ.get("XLA_FLAGS", "")
    environ["XLA_FLAGS"] = merged(before, list(GPU_FLAGS))
    return sorted(flag_names(environ["XLA_FLAGS"]) - flag_names(before))
