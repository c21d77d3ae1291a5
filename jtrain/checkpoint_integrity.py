"""Checksums of a checkpoint's arrays: computed at save, verified at restore.

A disk, a copy or a network filesystem may hand back other bytes than were written without
any read error: flipped bits in a weight load silently and change the losses, or turn into
NaN that is blamed on the learning rate. So each saved array (a packed group of
jtrain.packed_state, or a leaf of jtrain.array_state) gets a 32-bit checksum in the step's
metadata, computed on the devices in the same dispatch as the finite check, and recomputed on
the devices from the arrays a restore read. A mismatch makes the checkpoint damaged:
restoring falls back to an older one (jtrain.checkpoint).

The checksum is the sum, modulo 2**32, of a bijective mix of every 32-bit word. A change to
any one word always changes it; any other change goes unnoticed with probability 2**-32.
mix(0) = 0, so the zeros that pad a packed array to a multiple of the device count add
nothing and the checksum is the same on any mesh. Integer addition is associative, so the
sharded reduction gives the same value on any device count. Checkpoints written before
checksums (no "checksums" in their metadata) restore unverified.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Odd multipliers (MurmurHash3's finaliser): each step below is a bijection of uint32.
_M1, _M2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)


class ChecksumMismatch(ValueError):
    """The arrays a restore read are not those that were saved."""


def _words(x: jax.Array) -> jax.Array:
    """The array's bytes as uint32 words (narrower types widened, wider ones split), in its
    own shape: flattening an array sharded along an inner axis would gather it whole."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def _mix(w: jax.Array) -> jax.Array:
    w = w * _M1
    w = w ^ (w >> 15)
    return w * _M2


def checksums(packed: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{group: uint32 checksum} of packed arrays; traceable, so packing can compute it."""
    return {g: jnp.sum(_mix(_words(x)), dtype=jnp.uint32) for g, x in packed.items()}


_checksums = jax.jit(checksums)


def verify(packed: dict[str, jax.Array], expected: dict[str, int] | None) -> None:
    """Raises ChecksumMismatch naming each group whose checksum differs from the saved one;
    no `expected` (a checkpoint from before checksums) verifies nothing."""
    if not expected:
        return
    got = jax.device_get(_checksums({g: x for g, x in packed.items() if g in expected}))
    wrong = [
        f"{g} (saved {int(expected[g]):#010x}, read {int(v):#010x})"
        for g, v in sorted(got.items())
        if int(v) != int(expected[g])
    ]
    if wrong:
        raise ChecksumMismatch(f"checksum mismatch in {', '.join(wrong)}")
