"""Per-device memory of the train state, replicated (data=8) vs fully sharded (fsdp=8).

Run from the repo root: `python benchmarks/fsdp_memory.py [--config=configs/default.py]`.
Uses 8 fake CPU devices; prints parameter and optimizer-state bytes held by one device, from
the arrays' shards, and the compiled train step's argument bytes from XLA's memory analysis.
"""

import os
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import itertools  # noqa: E402

import jax  # noqa: E402

from jtrain import config as config_lib  # noqa: E402
from jtrain.data import pipeline  # noqa: E402
from jtrain.experiment import Experiment  # noqa: E402


def bytes_on_first_device(tree) -> int:
    """Bytes of the shards of `tree` that live on its first device."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def measure(config, **mesh) -> dict[str, int]:
    """Per-device bytes of params, optimizer state and compiled step arguments."""
    config = config_lib.load(config) if isinstance(config, str) else config
    config.mesh.update(mesh)
    exp = Experiment.from_config(config)
    state = exp.init_state()
    batch = exp.global_batch(next(itertools.islice(pipeline.make_train_iterator(config), 1)))
    compiled = exp.train_step.lower(state, batch).compile()
    return {
        "params": bytes_on_first_device(state.params),
        "opt_state": bytes_on_first_device(state.opt_state),
        "step arguments (XLA)": compiled.memory_analysis().argument_size_in_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/default.py")
    args = parser.parse_args()
    replicated = measure(args.config, data=8, fsdp=1, tensor=1)
    sharded = measure(args.config, data=1, fsdp=8, tensor=1)
    print(f"config {args.config}, {len(jax.devices())} devices ({jax.devices()[0].device_kind})")
    print(f"{'per-device bytes':<24}{'data=8':>14}{'fsdp=8':>14}{'ratio':>8}")
    for key in replicated:
        ratio = replicated[key] / sharded[key]
        print(f"{key:<24}{replicated[key]:>14,}{sharded[key]:>14,}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
