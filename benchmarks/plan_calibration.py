"""XLA's memory for small variants of the Llama recipe, the figures `jtrain.plan`'s activation
formula (jtrain/plan_memory.py) is checked against.

Run from the repo root: `python benchmarks/plan_calibration.py` (needs libtpu: `pip install
libtpu==0.0.52`; each compile takes one to a few minutes on a 2-core host). Each case compiles
the real train step for a 4-chip v5p slice (FSDP over the 4 chips) with a few scanned layers,
so that one layer's memory and one attention's [rows, heads, L, L] scores are what XLA lays
out, and writes XLA's per-device memory by kind to tests/golden/plan_memory.json, which
tests/test_plan.py reads without libtpu.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402

from jtrain import aot  # noqa: E402
from jtrain import config as config_lib  # noqa: E402

TOPOLOGY = "v5p:2x2x1"
BASE = "configs/llama3_8b.py"
_SMALL = {
    "model.d_model": 1024,
    "model.n_heads": 8,
    "model.n_kv_heads": 2,
    "model.d_ff": 3584,
    "model.vocab_size": 32768,
    "train.microbatches": 1,
}
# name: overrides of the 8B recipe. Rows per chip = batch_size / 4.
CASES = {
    "2 rows of 2048, remat full": {
        **_SMALL,
        "model.n_layers": 2,
        "train.seq_len": 2048,
        "train.batch_size": 8,
    },
    "1 row of 4096, remat full": {
        **_SMALL,
        "model.n_layers": 2,
        "train.seq_len": 4096,
        "train.batch_size": 4,
    },
    "6 layers, remat full": {
        **_SMALL,
        "model.n_layers": 6,
        "train.seq_len": 4096,
        "train.batch_size": 4,
    },
    "6 layers, remat none": {
        **_SMALL,
        "model.n_layers": 6,
        "model.remat": "none",
        "train.seq_len": 4096,
        "train.batch_size": 4,
    },
    "6 layers, remat dots": {
        **_SMALL,
        "model.n_layers": 6,
        "model.remat": "dots",
        "train.seq_len": 4096,
        "train.batch_size": 4,
    },
    "70B's layers, 1 row of 8192": {
        "model.d_model": 8192,
        "model.n_heads": 64,
        "model.d_ff": 28_672,
        "model.n_layers": 2,
        "train.microbatches": 1,
        "train.seq_len": 8192,
        "train.batch_size": 4,
    },
}


def load(overrides: dict):
    """The 8B recipe with `overrides` ({"model.d_model": 1024, ...}) applied."""
    config = config_lib.load(BASE)
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="tests/golden/plan_memory.json")
    parser.add_argument("--only", default="", help="compile only cases whose name has this")
    args = parser.parse_args()
    out = {
        "jax": jax.__version__,
        "libtpu": aot.LIBTPU_PIN.split("==")[1],
        "base": BASE,
        "topology": TOPOLOGY,
        "cases": [],
    }
    for name, overrides in CASES.items():
        if args.only not in name:
            continue
        report = aot.compile_report(load(overrides), TOPOLOGY)
        memory = report["memory_per_device_bytes"]
        print(f"{name}: {memory} in {report['compile_s']:.0f} s", flush=True)
        out["cases"].append({"name": name, "overrides": overrides, "xla": memory})
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
