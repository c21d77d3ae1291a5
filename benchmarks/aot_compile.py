"""The Llama 3 recipes compiled for their TPU topologies on a CPU host (jtrain.aot).

Run from the repo root: `python benchmarks/aot_compile.py` (needs libtpu: `pip install
libtpu==0.0.52`). For each recipe and topology it compiles the real train step and the
checkpoint's packing step with XLA's TPU compiler, and writes XLA's per-device memory by kind,
the step's FLOPs and the compile times to benchmarks/results/aot_llama3.txt.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from jtrain import aot, plan  # noqa: E402
from jtrain import config as config_lib  # noqa: E402

# The recipes and the topologies their docstrings name; then, for the record, the 8B as it was
# before its micro-batches (4 sequences per chip), which XLA cannot fit.
RUNS = (
    ("configs/llama3_8b.py", "v5p:4x4x4", {}),
    ("configs/llama3_70b.py", "v5p:4x8x8", {}),
    ("configs/llama3_8b.py", "v5p:4x4x4", {"train.microbatches": 1}),
)
GIB = 2**30


def estimate(config_path: str, overrides: dict, report: dict) -> str:
    """jtrain.plan's estimate of the same step, by the kinds XLA reports."""
    config = load(config_path, overrides)
    mem = plan.make_plan(config, "v5p", report["chips"], 0.4, 0.0)["memory_per_device_bytes"]
    temporaries = mem["gradients"] + mem["activations"] + mem["gathered_weights"]
    return (
        f"  plan's estimate           temporaries {temporaries / GIB:.2f} GiB, total "
        f"{mem['total'] / GIB:.2f} GiB"
    )


def load(config_path: str, overrides: dict):
    config = config_lib.load(config_path)
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def describe(config_path: str, report: dict) -> list[str]:
    """The report as aligned text lines."""
    memory = report["memory_per_device_bytes"]
    kinds = ("arguments", "outputs", "aliased", "temporaries", "total")
    lines = [
        f"{config_path} on {report['topology']} ({report['chips']} x {report['device_kind']}, "
        f"mesh {report['mesh']}), {report['params'] / 1e9:.2f}B trained parameters",
        f"  train step compile        {report['compile_s']:8.1f} s",
    ]
    flops = [
        f"  FLOPs per step            {report['flops_per_step']:.4e} traced matmuls "
        f"({report['flops_per_device']:.4e} per chip); jtrain's model count "
        f"{report['model_flops_per_step']:.4e} (ratio "
        f"{report['flops_per_step'] / report['model_flops_per_step']:.3f})",
    ]
    if not report["fits"]:
        return [
            *lines,
            f"  DOES NOT FIT: XLA needs {memory['temporaries'] / GIB:.2f} GiB of temporaries "
            f"(+ {memory['arguments'] / GIB:.2f} GiB of state and batch) against "
            f"{report['hbm_bytes'] / GIB:.2f} GiB of HBM per chip",
            f"  XLA: {report['compile_error']}",
            *flops,
        ]
    save = report["save"]["memory_per_device_bytes"]
    lines += [
        "  train step per device     " + ", ".join(f"{k} {memory[k] / GIB:.2f} GiB" for k in kinds),
        f"  checkpoint save ({report['save']['layout']})".ljust(28)
        + ", ".join(f"{k} {save[k] / GIB:.2f} GiB" for k in kinds)
        + f" (compile {report['save']['compile_s']:.1f} s)",
        *flops,
        f"  XLA cost analysis         {report['xla_cost_flops_per_device']:.4e} per chip "
        "(counts the scanned layers' loop body once)",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/aot_llama3.txt")
    parser.add_argument("--only", default="", help="run only recipes whose path contains this")
    args = parser.parse_args()
    lines = [
        f"# jtrain.aot on a CPU host: jax {jax.__version__}, libtpu "
        f"{aot.LIBTPU_PIN.split('==')[1]}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}",
        "# total = arguments + outputs - aliased (donated) + temporaries: XLA's peak per chip.",
    ]
    for path, topology, overrides in RUNS:
        if args.only not in path:
            continue
        report = aot.compile_report(load(path, overrides), topology)
        name = " ".join([path, *(f"--config.{k}={v}" for k, v in overrides.items())])
        described = [*describe(name, report), estimate(path, overrides, report)]
        lines += described
        print("\n".join(described), flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
