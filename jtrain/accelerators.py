"""The accelerators `jtrain.plan` plans for: each one's dense bf16 peak and memory, with sources.

Peaks come from `jtrain.metrics.PEAK_FLOPS` (the table MFU is measured against), so a plan's
step time and a run's MFU use the same figure. Memory is what one chip (a TPU chip, a GPU) has:
TPUs in GiB as Google's system-architecture pages give it; GPUs in GB (10^9 bytes) as NVIDIA's
datasheets give it, a little under what the cards report. On GPUs JAX preallocates and keeps to
a fraction of that memory (`XLA_PYTHON_CLIENT_MEM_FRACTION`, 0.75 unless set), so a plan counts
only that fraction as usable.
"""

from __future__ import annotations

import dataclasses
import os

from jtrain.errors import UserError
from jtrain.metrics import PEAK_FLOPS

GIB = 2**30
GB = 10**9
# jax's default for XLA_PYTHON_CLIENT_MEM_FRACTION (its GPU memory docs): what JAX may use.
JAX_GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One chip: its name on the command line, peak, memory and where they come from."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: int
    source: str
    compute_capability: str = ""  # NVIDIA GPUs only: what decides cuDNN attention

    @property
    def is_gpu(self) -> bool:
        return bool(self.compute_capability)

    def usable_bytes(self) -> int:
        """The memory a jtrain process may allocate on one chip."""
        if not self.is_gpu:
            return self.hbm_bytes
        fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
        try:
            share = float(fraction) if fraction else JAX_GPU_MEMORY_FRACTION
        except ValueError:
            raise UserError(
                f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction!r} is invalid: use a number in (0, 1]"
            ) from None
        return int(self.hbm_bytes * share)


def _tpu(name: str, kind: str, gib: int, page: str) -> Accelerator:
    source = f"cloud.google.com/tpu/docs/{page}: {gib} GiB HBM per chip"
    return Accelerator(name, PEAK_FLOPS[kind], gib * GIB, source)


def _gpu(name: str, kind: str, gb: int, capability: str, sheet: str) -> Accelerator:
    return Accelerator(name, PEAK_FLOPS[kind], gb * GB, f"{sheet}: {gb} GB", capability)


ACCELERATORS = {
    a.name: a
    for a in (
        _tpu("v4", "tpu v4", 32, "v4"),
        _tpu("v5e", "tpu v5e", 16, "v5e"),
        _tpu("v5p", "tpu v5p", 95, "v5p"),
        _tpu("v6e", "tpu v6e", 32, "v6e"),
        _gpu("a100", "a100", 80, "8.0", "NVIDIA A100 80GB SXM datasheet"),
        _gpu("a100-40gb", "a100", 40, "8.0", "NVIDIA A100 40GB SXM datasheet"),
        _gpu("h100", "h100", 80, "9.0", "NVIDIA H100 SXM datasheet"),
        _gpu("h200", "h200", 141, "9.0", "NVIDIA H200 SXM datasheet"),
        # The B200 chip carries 192 GB; HGX and DGX B200 systems expose 180 GB per GPU.
        _gpu("b200", "b200", 180, "10.0", "NVIDIA HGX B200 datasheet (1,440 GB per 8 GPUs)"),
    )
}


def get(name: str) -> Accelerator:
    """The accelerator `--accelerator=name` names; UserError listing the known ones."""
    if name not in ACCELERATORS:
        raise UserError(f"--accelerator={name!r} is invalid: allowed: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[name]
