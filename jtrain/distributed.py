"""Joining a multi-process run (several hosts, or several processes on one machine).

Every process runs the same command and `initialize` connects them before JAX starts its
backends: with `--distributed`, JAX finds the others itself on the clusters it knows (Cloud
TPU pod slices, GKE, SLURM, Open MPI); elsewhere `--coordinator_address`, `--num_processes`
and `--process_id` say where process 0 listens and who is who. Without either, the run is a
single process and nothing is initialised.
"""

from __future__ import annotations

import os

import jax

from jtrain.errors import UserError


class SetupError(UserError, ValueError):
    """Multi-process flags that cannot work together; the message says which."""


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> None:
    """Connects this process to the others of its run; a no-op for a single process."""
    explicit = coordinator_address is not None
    if explicit and auto:
        raise SetupError("give --distributed or --coordinator_address, not both")
    if explicit and (num_processes is None or process_id is None):
        raise SetupError(
            "--coordinator_address needs --num_processes and --process_id as well "
            "(the same address and count on every process, a distinct id on each)"
        )
    if explicit and not 0 <= process_id < num_processes:
        raise SetupError(f"--process_id={process_id} must be in [0, --num_processes)")
    if not (explicit or auto):
        return
    if _platform() == "cpu":
        # CPU processes exchange collectives through Gloo; by default they have none.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()


def _platform() -> str:
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    return platforms.split(",")[0]
