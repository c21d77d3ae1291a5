"""FLOP accounting for benchmarks/mfu.py: a device's peak FLOP/s, nominal and measured, and
what XLA's cost analysis counts of a train step.

Nominal peaks are the dense (no 2:4 sparsity) tensor-core rates of the vendors' datasheets.
float32 matmuls run at JAX's default precision, which computes them in TF32 on NVIDIA GPUs
since Ampere and in one bfloat16 pass on TPUs, so a float32 step is held against the TF32
rate on those GPUs and against the bfloat16 rate on TPUs.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jtrain import metrics
from jtrain.models.transformer import TransformerConfig

# Dense bfloat16 peak FLOP/s per chip: the trainer's own table (its MFU uses it) plus B200.
BF16_PEAK: dict[str, float] = {**metrics.PEAK_FLOPS, "b200": 2.25e15}
# Dense TF32 tensor-core FLOP/s (the datasheets' figures with sparsity, halved). TPU kinds
# are absent on purpose: their float32 matmuls run at the bfloat16 rate (one bf16 pass).
TF32_PEAK: dict[str, float] = {
    "a100": 156e12,
    "h100": 494.7e12,
    "h100 pcie": 378e12,
    "h100 nvl": 417.5e12,
    "h200": 494.7e12,
    "b200": 1.1e15,
}
F32_NOTE = {"gpu": "TF32 tensor cores, JAX's default f32 matmul precision", "tpu": "bf16 rate"}


def _lookup(table: dict[str, float], device_kind: str) -> float:
    """The entry whose key is the longest lowercase substring of device_kind; 0 if none."""
    kind = device_kind.lower()
    matches = [key for key in table if key in kind]
    return table[max(matches, key=len)] if matches else 0.0


def nominal_peak(device: jax.Device, dtype: str) -> float:
    """The datasheet's dense peak FLOP/s of `device` for matmuls in `dtype`; 0 if unknown."""
    bf16 = _lookup(BF16_PEAK, device.device_kind)
    if dtype == "bfloat16" or device.platform == "tpu":
        return bf16
    return _lookup(TF32_PEAK, device.device_kind)


def measure_matmul_flops(device: jax.Device, dtype: str, n: int, seconds: float) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on `device`, timed for about `seconds`.

    Calls are dispatched in rounds and waited for once per round, so the time is the
    device's, not the host's dispatch latency (a round lasts about a tenth of `seconds`).
    """
    # Random operands: a matmul of constants can run faster (less power) than real data.
    rng = np.random.default_rng(0)
    a, b = (jax.device_put(rng.standard_normal((n, n), np.float32), device) for _ in range(2))
    a, b = a.astype(dtype), (b * n**-0.5).astype(dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile, then once more to time one call
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    per_round = max(1, int(0.1 * seconds / max(time.perf_counter() - start, 1e-6)))
    count, start = 0, time.perf_counter()
    while count == 0 or time.perf_counter() - start < seconds:
        for _ in range(per_round):
            out = matmul(a, b)
        out.block_until_ready()
        count += per_round
    return 2.0 * n**3 * count / (time.perf_counter() - start)


def xla_flops(compiled) -> float:
    """The FLOPs XLA's cost analysis counts in a compiled program (0 if it counts none)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", 0.0))


@functools.cache
def xla_counts_loop_body_once() -> bool:
    """Whether XLA's cost analysis counts a while loop's body once, whatever its trip count.

    The jaxlib this was written against does (a scan of 4 matmuls counts as 1), which hides
    all but one of the scanned layers; checked here so the comparison follows the jaxlib."""
    n, trips = 64, 4

    def scanned(x, ws):
        return jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0]

    x, ws = jnp.ones((n, n)), jnp.ones((trips, n, n))
    counted = xla_flops(jax.jit(scanned).lower(x, ws).compile())
    return counted < 2 * (2 * n**3)


def flops_as_xla_counts(cfg: TransformerConfig, seq_len: int) -> float:
    """Our training FLOPs of one sequence, counted the way XLA's cost analysis counts them.

    Where XLA counts a loop's body once, that is one of the scanned blocks and, with
    `loss_chunk`, the LM head on one chunk of positions (the head runs in a `lax.map`).
    """
    per_sequence = seq_len * cfg.flops_per_token(seq_len)
    if not xla_counts_loop_body_once():
        return per_sequence
    head_per_token = 6.0 * cfg.d_model * cfg.vocab_size
    one_block = dataclasses.replace(cfg, n_layers=1).flops_per_token(seq_len) - head_per_token
    chunk = cfg.loss_chunk if 0 < cfg.loss_chunk < seq_len else seq_len
    return seq_len * one_block + chunk * head_per_token
