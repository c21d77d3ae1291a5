"""How a checkpoint holds the train state: packed into a few flat arrays, or array by array.

Orbax's cost per save grows with the number of arrays (benchmarks/checkpoint_layout.py
measures it), and packing (jtrain.packed_state) saves that at the price of a copy of the
whole state on every device and a reshuffle across them at every save. That price is small
for a small state and a device's worth of memory for a large one, so a state under
PACK_BELOW_BYTES is packed and a larger one saved per array (jtrain.array_state), each array
with its own sharding and readable by plain Orbax. The step's metadata says which ("layout"),
so either kind restores whatever the current rule is, onto any mesh; checkpoints from before
the per-array layout are packed and carry no "kind".
"""

from __future__ import annotations

import math
import os

import jax

from jtrain import array_state, checkpoint_integrity, packed_state

PACKED, ARRAYS, AUTO = "packed", "arrays", "auto"
KINDS = (AUTO, PACKED, ARRAYS)
# Measured on 8 CPU devices (benchmarks/results/checkpoint_layout_cpu.txt, same run): packed
# saves took 0.45-0.5x the per-array time for 1 and 10 MiB states (Orbax's per-array cost
# dominates), 3.3x for a 154 MiB one; and packing a sharded state needs about 1.8x the WHOLE
# state on each device (XLA gathers leaves sharded along inner axes to flatten them), against
# ~0 per array. The crossover lies between 10 and 154 MiB: pack below 32 MiB, where that copy
# is under 60 MiB per device.
PACK_BELOW_BYTES = 32 << 20


def state_bytes(state) -> int:
    """Bytes of the state's arrays (a PRNG key counts as its key data)."""
    total = 0
    for x in jax.tree.leaves(state):
        data = jax.eval_shape(jax.random.key_data, x) if packed_state.is_key(x) else x
        total += math.prod(data.shape) * data.dtype.itemsize
    return total


def choose(state, kind: str = AUTO) -> str:
    """The layout a save of `state` uses: `kind`, or with "auto" the size rule above."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint layout {kind!r} is not one of {', '.join(KINDS)}")
    if kind != AUTO:
        return kind
    return PACKED if state_bytes(state) < PACK_BELOW_BYTES else ARRAYS


def prepared(state, kind: str) -> tuple[dict, dict, bool, dict[str, int]]:
    """(layout, tree for Orbax to save, all finite, checksums) of `state` saved as `kind`:
    one jitted dispatch, compiled once per state structure."""
    if kind == PACKED:
        layout, pack = packed_state.packer_for(state)
        flat, finite, sums = pack(state)  # a copy, so the next step may donate the state
        tree = packed_state.nest(flat)
    else:
        layout, check = array_state.checker_for(state)
        finite, sums = check(state)
        tree = array_state.saved_tree(state)  # Orbax copies it to the host before `save` returns
    finite, sums = jax.device_get((finite, sums))
    return layout, tree, bool(finite), {name: int(value) for name, value in sums.items()}


def save_program(abstract_state, kind: str = AUTO):
    """(layout kind, the jitted program a save runs on the devices) for an abstract state:
    what an ahead-of-time compile of the save path should compile."""
    kind = choose(abstract_state, kind)
    captured = {}

    def layout(s):  # PRNG keys only tell their implementation when traced
        module = packed_state if kind == PACKED else array_state
        captured["layout"] = module.layout_of(s)
        return 0

    jax.eval_shape(layout, abstract_state)
    if kind == ARRAYS:
        return kind, array_state._checker(captured["layout"])
    shardings = [x.sharding for x in jax.tree.leaves(abstract_state)]
    return kind, packed_state._packer(captured["layout"], shardings)


def saved_layout(manager, step: int) -> dict | None:
    """The step's custom metadata (layout, data position, checksums), or None for a
    checkpoint from before packing, whose data position was an item of its own."""
    unreadable = None
    try:
        custom = manager.metadata(step).custom_metadata or {}
    except Exception as err:  # noqa: BLE001 - unreadable: neither kind, reported below
        custom, unreadable = {}, err
    if "layout" in custom:
        return custom
    if os.path.isdir(os.path.join(str(manager.directory), str(step), "data")):
        return None
    raise ValueError(
        f"the metadata of step {step} (its layout and data position) is unreadable"
    ) from unreadable


def _module(layout: dict):
    return array_state if layout.get("kind") == ARRAYS else packed_state


def read_arrays(manager, step: int, layout: dict, abstract_tree, prefix: str = "") -> dict:
    """The saved arrays holding the leaves of `abstract_tree`, on its shardings' devices."""
    return _module(layout).read(manager, step, layout, abstract_tree, prefix)


def restored(arrays: dict, custom: dict, abstract_tree, prefix: str = ""):
    """`abstract_tree` from `read_arrays`' arrays, once they match the saved checksums."""
    checkpoint_integrity.verify(arrays, custom.get("checksums"))
    layout = custom["layout"]
    return _module(layout).unpack(arrays, layout, abstract_tree, prefix)
