"""Checkpoint layouts compared: the state packed into flat arrays against saved per array.

For each state size (a model of configs/default.py resized; the train state is its
parameters, Adam moments, step and key) and each layout, it saves the state with
`Checkpoints(..., layout=...)` into a fresh directory and reports, after one untimed save that
compiles:

- save ms: the median of `--saves` blocking saves (`save` then `wait`), wall time;
- blocking ms: the median time `save` itself takes (the loop's stall; the write continues in
  the background);
- extra device memory: what XLA's memory analysis says the save's device program needs
  beyond the state itself, on the busiest device (outputs + temporaries): for packed, the
  copy of the state in flat arrays; for per-array, the finite check's and checksums' scalars.

The state is sharded over every device the process has, with mesh.fsdp=-1 (so packing moves
data across devices as it would on a pod). The ratios packed/arrays come from the same run.

    JAX_NUM_CPU_DEVICES=8 python benchmarks/checkpoint_layout.py [--saves 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jtrain import checkpoint, checkpoint_layout  # noqa: E402
from jtrain import config as config_lib  # noqa: E402
from jtrain.experiment import Experiment  # noqa: E402

SIZES = {  # name: model overrides
    "small": dict(d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=8, d_ff=128),
    "default": {},
    "larger": dict(d_model=384, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=48, d_ff=1536),
}


def _state(overrides: dict):
    config = config_lib.load("configs/default.py")
    config.model.update(overrides)
    config.mesh.data, config.mesh.fsdp = 1, -1
    exp = Experiment.from_config(config)
    return config, exp.init_state()


def _extra_bytes(state, kind: str) -> int:
    _, program = checkpoint_layout.save_program(state, kind)
    m = program.lower(state).compile().memory_analysis()
    return int(m.output_size_in_bytes + m.temp_size_in_bytes)


def _timed(config, state, kind: str, saves: int) -> tuple[float, float]:
    """(median save+wait ms, median blocking save ms) over `saves` saves after a warm-up."""
    total, blocking = [], []
    with tempfile.TemporaryDirectory() as workdir:
        ckpts = checkpoint.Checkpoints(workdir, config.checkpoint, layout=kind)
        for i in range(saves + 1):
            step_state = state.replace(step=state.step + i)
            start = time.perf_counter()
            ckpts.save(step_state, data_state={}, config={}, started=0.0)
            saved = time.perf_counter()
            ckpts.wait()
            if i:  # the first save compiles
                blocking.append(1e3 * (saved - start))
                total.append(1e3 * (time.perf_counter() - start))
        ckpts.close()
    return statistics.median(total), statistics.median(blocking)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"auto packs states under {checkpoint_layout.PACK_BELOW_BYTES / 2**20:.0f} MiB")
    header = f"{'state':8} {'MiB':>8} {'arrays':>6} {'layout':7} {'save ms':>8} {'block ms':>8}"
    print(header + f" {'extra MiB/dev':>13}")
    for name, overrides in SIZES.items():
        config, state = _state(overrides)
        mib = checkpoint_layout.state_bytes(state) / 2**20
        count = len(jax.tree.leaves(state))
        results = {}
        for kind in (checkpoint_layout.PACKED, checkpoint_layout.ARRAYS):
            save_ms, block_ms = _timed(config, state, kind, args.saves)
            extra = _extra_bytes(state, kind) / 2**20
            results[kind] = save_ms
            print(
                f"{name:8} {mib:8.1f} {count:6} {kind:7} {save_ms:8.1f} {block_ms:8.1f} "
                f"{extra:13.2f}"
            )
        ratio = results["packed"] / results["arrays"]
        print(f"{name:8} packed/arrays save time: {ratio:.2f}")


if __name__ == "__main__":
    main()
