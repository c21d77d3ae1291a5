"""Cost of checkpoint checksums: saving and restoring with verification against without.

jtrain.checkpoint_integrity adds a 32-bit checksum per packed array: computed on the devices
in the jitted dispatch that packs the state at save, recomputed on the devices from the
arrays a restore read, and compared. This measures what that costs, on train states of a few
sizes (one parameter array and two Adam-like moment arrays of the same size, float32, plus
the step, the PRNG key and the skip counter), on one device, in one process:

- verified: `Checkpoints.save` + `wait` and `Checkpoints.restore_latest` as jtrain runs them.
- unverified: the same, with `checkpoint_integrity.checksums` replaced by one that computes
  nothing, so packing computes no checksum, the metadata holds none and restoring verifies
  nothing (the path of a checkpoint written before checksums).
- verify alone: `checkpoint_integrity.verify` on arrays already read (what restoring adds).

Each size writes one checkpoint per mode to a temporary directory (the page cache then serves
the restores: verification is compute, so a cold disk would only make its share smaller).
Timed rounds alternate the modes (A B, B A, ...) so load from other processes hits both
alike. The report gives medians, the cost per GB of state (verified minus unverified, and
verify alone) and RATIO verified / unverified restore, measured in the same run. On CPU the
checksum runs at XLA:CPU's integer throughput (a few GB/s); on an accelerator it
is one more pass over the state in device memory.

Run from the repository root (no install needed):

    python benchmarks/checkpoint_verify.py
    python benchmarks/checkpoint_verify.py --sizes_mb 64,1024 --rounds 5

It always exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from benchmarks.checkpoint_stall import state_bytes  # noqa: E402
from jtrain import checkpoint_integrity, packed_state  # noqa: E402
from jtrain.checkpoint import Checkpoints  # noqa: E402
from jtrain.state import TrainState  # noqa: E402

MODES = ("unverified", "verified")
CHECKSUMS = checkpoint_integrity.checksums


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes_mb", default="64,256", help="train state sizes (MB), comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per mode and size")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    args.sizes_mb = [int(n) for n in args.sizes_mb.split(",")]
    return args


def synthetic_state(megabytes: int) -> TrainState:
    """Parameters and two moments of one float32 array each: `megabytes` MB in all."""
    n = megabytes * 2**20 // 12
    keys = jax.random.split(jax.random.key(0), 3)
    params, mu, nu = (jax.random.normal(k, (n,), jnp.float32) for k in keys)
    return TrainState(
        params={"w": params},
        opt_state={"mu": mu, "nu": nu},
        step=jnp.asarray(1, jnp.int32),
        rng=jax.random.key(1),
        skipped=jnp.asarray(0, jnp.int32),
    )


PACKERS = {mode: {} for mode in MODES}  # each mode's compiled packers


def use_mode(mode: str) -> None:
    """Switches checksums at save and verification at restore on or off."""
    checkpoint_integrity.checksums = CHECKSUMS if mode == "verified" else lambda packed: {}
    packed_state._PACKERS = PACKERS[mode]


class Timings:
    """One mode's checkpoint of one state, and its save, restore and verify times."""

    def __init__(self, state: TrainState, mode: str, ckpt_cfg):
        self.state, self.mode, self.ckpt_cfg = state, mode, ckpt_cfg
        self.workdir = tempfile.mkdtemp(prefix=f"jtrain_verify_{mode}_")
        self.abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        self.times: dict[str, list[float]] = {"save": [], "save_wait": [], "restore": []}
        self.times["verify"] = []

    def save(self, step: int) -> None:
        use_mode(self.mode)
        ckpts = Checkpoints(self.workdir, self.ckpt_cfg)
        state = self.state.replace(step=jnp.asarray(step, jnp.int32))
        jax.block_until_ready(state)
        start = time.perf_counter()
        ckpts.save(state, data_state={}, config={}, started=start)
        blocking = time.perf_counter() - start
        ckpts.wait()
        total = time.perf_counter() - start
        ckpts.close()
        if step > 1:  # the first save compiles the packing
            self.times["save"].append(blocking)
            self.times["save_wait"].append(total)

    def restore(self) -> None:
        use_mode(self.mode)
        ckpts = Checkpoints(self.workdir, self.ckpt_cfg, read_only=True)
        start = time.perf_counter()
        restored, _, _ = ckpts.restore_latest(self.abstract)
        jax.block_until_ready(restored)
        self.times["restore"].append(time.perf_counter() - start)
        ckpts.close()

    def verify(self) -> None:
        """verify() alone on the latest checkpoint's arrays, read beforehand."""
        ckpts = Checkpoints(self.workdir, self.ckpt_cfg, read_only=True)
        step = ckpts.steps()[-1]
        custom = ckpts.manager.metadata(step).custom_metadata
        packed = packed_state.read(ckpts.manager, step, custom["layout"], self.abstract)
        jax.block_until_ready(packed)
        start = time.perf_counter()
        checkpoint_integrity.verify(packed, custom["checksums"])
        self.times["verify"].append(time.perf_counter() - start)
        ckpts.close()

    def run(self, step: int) -> None:
        self.save(step)
        self.restore()
        if self.mode == "verified":
            self.verify()


def measure(state: TrainState, rounds: int, ckpt_cfg) -> dict[str, Timings]:
    timings = {mode: Timings(state, mode, ckpt_cfg) for mode in MODES}
    for t in timings.values():  # warm: compile the packing, unpacking and checksums
        t.run(1)
        t.times["restore"].clear()
        t.times["verify"].clear()
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else reversed(MODES):
            timings[mode].run(2 + r)
    for t in timings.values():
        shutil.rmtree(t.workdir, ignore_errors=True)
    use_mode("verified")
    return timings


def report(megabytes: int, nbytes: int, timings: dict[str, Timings]) -> None:
    gb = nbytes / 1e9
    print(f"\n== train state {nbytes / 1e6:,.1f} MB ({megabytes} MiB asked)")
    print(f"{'ms (median)':<26}{'unverified':>12}{'verified':>12}{'difference':>12}{'ms/GB':>10}")
    med = {
        m: {k: statistics.median(v) for k, v in t.times.items() if v} for m, t in timings.items()
    }
    for key, label in (
        ("save", "save (blocking part)"),
        ("save_wait", "save + wait (on disk)"),
        ("restore", "restore_latest"),
    ):
        off, on = 1e3 * med["unverified"][key], 1e3 * med["verified"][key]
        print(f"{label:<26}{off:>12.1f}{on:>12.1f}{on - off:>12.1f}{(on - off) / gb:>10.1f}")
    alone = 1e3 * med["verified"]["verify"]
    print(f"{'verify alone (restore)':<26}{'':>12}{alone:>12.1f}{'':>12}{alone / gb:>10.1f}")
    print(f"checksum throughput      : {gb / (alone / 1e3):.2f} GB/s (verify alone)")
    ratio = med["verified"]["restore"] / med["unverified"]["restore"]
    print(f"RATIO verified / unverified restore = {ratio:.3f}")
    save_ratio = med["verified"]["save_wait"] / med["unverified"]["save_wait"]
    print(f"ratio verified / unverified save + wait = {save_ratio:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = jax.devices()[0]
    ckpt_cfg = ml_collections.ConfigDict({"keep": 2, "keep_best": False})
    print("checkpoint_verify: Checkpoints.save and restore_latest with checksums vs without")
    print(f"device           : {device.platform} / {device.device_kind} ({device}), 1 device")
    print(f"versions         : jax {jax.__version__}, orbax-checkpoint {ocp.__version__}")
    print(f"machine          : {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"rounds           : {args.rounds} per mode and size, alternating")
    for megabytes in args.sizes_mb:
        state = synthetic_state(megabytes)
        report(megabytes, state_bytes(state), measure(state, args.rounds, ckpt_cfg))
        del state
    print(f"\nload average     : {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
