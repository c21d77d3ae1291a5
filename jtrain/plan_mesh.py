"""A step's memory per device for one mesh, and the mesh `jtrain.plan` suggests when the
config's does not fit.

The search covers every (data, fsdp, tensor) split of the chips with a tensor axis of at most
`MAX_TENSOR` (one NVLink node, a TPU's nearest neighbours) and every micro-batch count that
divides the batch, keeping those whose estimate fits. Of these it picks the one that costs least
communication and speed: the smallest tensor axis (its all-reduces sit inside every layer),
then the fewest micro-batches (smaller matmuls), then the largest data axis (replicas exchange
only gradients, once a step, where FSDP gathers every weight).
"""

from __future__ import annotations

import functools
import itertools

from jtrain import mesh as mesh_lib
from jtrain import plan_memory as memory
from jtrain.models.transformer import TransformerConfig

MAX_TENSOR = 8
# A plan "fits" when its estimate is within this share of the chip's usable memory: the rest
# is for what the estimate leaves out (XLA's scratch buffers, fragmentation, collectives).
FIT_SHARE = 0.9


def memory_bytes(config, state, sizes: tuple[int, ...], microbatches: int, kernel: str) -> dict:
    """Bytes per device by kind, and their total, for this mesh and micro-batch count.

    ValueError when a mesh axis does not divide a sharded dimension.
    """
    rules = mesh_lib.parse_rules(config.mesh.rules)
    out = memory.state_bytes(state, sizes, rules, microbatches)
    out.update(_activations(config, sizes, rules, microbatches, kernel))
    out["batch"] = memory.batch_bytes(config, sizes, rules)
    out["total"] = sum(v for v in out.values() if v is not None)
    return out


def _activations(config, sizes, rules, microbatches: int, kernel: str) -> dict:
    """The transformer's activations; None where jtrain has no formula (other families)."""
    if config.model.get("kind", "transformer") != "transformer":
        return {"activations": None, "gathered_weights": None}
    cfg = TransformerConfig.from_mapping(config.model)
    split = memory.Split.of(config, sizes, rules, microbatches)
    return memory.activation_bytes(cfg, config.train.seq_len, split, kernel)


def suggest(config, state, chips: int, kernel: str, budget: int) -> dict | None:
    """The cheapest (data, fsdp, tensor, microbatches) whose estimate is within `budget`
    bytes per device (see the module's docstring), with its total; None if none fits."""
    rules = mesh_lib.parse_rules(config.mesh.rules)
    batch = config.train.batch_size
    for micro, sizes in _candidates(chips, batch):
        if batch % (micro * _batch_ways(sizes, rules)):
            continue
        try:
            total = memory_bytes(config, state, sizes, micro, kernel)["total"]
        except ValueError:  # a mesh axis that does not divide some weight
            continue
        if total <= budget:
            shape = dict(zip(mesh_lib.MESH_AXES, sizes, strict=True))
            return {**shape, "microbatches": micro, "total_bytes": total}
    return None


def _candidates(chips: int, batch: int) -> list[tuple[int, tuple[int, ...]]]:
    """(microbatches, sizes) in the order of preference."""
    divisors = _divisors(chips)
    splits = []
    for tensor in (t for t in divisors if t <= MAX_TENSOR):
        for data in _divisors(chips // tensor):
            splits.append((tensor, (data, chips // tensor // data, tensor)))
    micros = _divisors(batch)
    ranked = sorted(itertools.product(splits, micros), key=lambda c: (c[0][0], c[1], -c[0][1][0]))
    return [(micro, sizes) for (_, sizes), micro in ranked]


def _batch_ways(sizes: tuple[int, ...], rules) -> int:
    shape = dict(zip(mesh_lib.MESH_AXES, sizes, strict=True))
    ways = 1
    for axis in rules.get("batch", ()):
        ways *= shape[axis]
    return ways


@functools.cache
def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)
