"""Joining a multi-process run (several hosts, or several processes on one machine).

Every process runs the same command; `initialize` connects them before JAX starts its
backends. The coordinator comes from the command line (`--coordinator_address`,
`--num_processes`, `--process_id`), or JAX finds it itself on a cluster it knows (a TPU pod
slice, SLURM, Open MPI). A lone process on a workstation initialises nothing.
"""

from __future__ import annotations

import os

import jax

# Environment variables that say this process is one of several that JAX can connect itself.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_TPU_HOSTS_VARIABLE = "TPU_WORKER_HOSTNAMES"


class SetupError(ValueError):
    """Multi-process flags that cannot work together; the message says which."""


def _cluster_detected() -> bool:
    """True where JAX's own cluster detection will find the other processes."""
    if any(int(os.environ.get(name, "1") or 1) > 1 for name in _CLUSTER_SIZE_VARIABLES):
        return True
    return len(os.environ.get(_TPU_HOSTS_VARIABLE, "").split(",")) > 1


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Connects this process to the others of its run; a no-op for a single process."""
    explicit = coordinator_address is not None
    if explicit and (num_processes is None or process_id is None):
        raise SetupError(
            "--coordinator_address needs --num_processes and --process_id as well "
            "(the same address and count on every process, a distinct id on each)"
        )
    if explicit and not 0 <= process_id < num_processes:
        raise SetupError(f"--process_id={process_id} must be in [0, --num_processes)")
    if not explicit and not _cluster_detected():
        return
    if (num_processes or 2) > 1 and _platform() == "cpu":
        # CPU processes exchange collectives through Gloo; the default is none across them.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()


def _platform() -> str:
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    return platforms.split(",")[0]
