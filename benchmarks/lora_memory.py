"""Per-device memory and step time of LoRA against full fine-tuning of the same model.

Three sides train the same model (same config, same seed, same fixed batch) in one process:
full fine-tuning (model.lora.rank=0), LoRA (float32 base) and LoRA on an int8 base. For each
it prints the bytes one device holds of trained parameters, frozen parameters and optimizer
state (from the sharded state's arrays), XLA's memory analysis of the compiled train step
(arguments, temporaries, and the bytes aliased from input to output: the donated state, the
frozen base included, which is not copied), and the step time, measured in blocks that
alternate between the sides (A B C, C B A, ...) so that load from other processes hits all
alike. Ratios are against full fine-tuning. It also prints the int8 base's logit error
against the float base. It writes nothing and exits 0.

Run from the repository root:

    python benchmarks/lora_memory.py
    python benchmarks/lora_memory.py --set model.d_model=512 --set model.n_layers=8 ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` and `configs` without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jtrain.config  # noqa: E402
from benchmarks import overrides  # noqa: E402
from jtrain.data import pipeline  # noqa: E402
from jtrain.experiment import Experiment  # noqa: E402

SIDES = {
    "full": dict(rank=0, base_dtype="float32"),
    "lora": dict(base_dtype="float32"),
    "lora int8": dict(base_dtype="int8"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "default.py"))
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the LoRA sides")
    p.add_argument("--targets", default="all", help="model.lora.targets of the LoRA sides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, e.g. model.d_model=512 (repeatable)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5, help="timed blocks per side")
    p.add_argument("--steps_per_round", type=int, default=3, help="steps in each timed block")
    return p.parse_args(argv)


def side_config(args, side: str):
    """The config file with --set overrides and the side's LoRA settings."""
    config = overrides.apply(jtrain.config.load(args.config), args.set)
    config.model.lora.rank = args.rank
    config.model.lora.targets = args.targets
    config.model.lora.update(SIDES[side])
    jtrain.config.validate(config)
    return config


def first_device_bytes(tree) -> int:
    """Bytes of the shards of `tree` held by the first device."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


class Side:
    """One way of training: its experiment, state, fixed batch and compiled step."""

    def __init__(self, name: str, config, local_batch):
        self.name = name
        self.exp = Experiment.from_config(config)
        self.state = self.exp.init_state()
        self.batch = self.exp.global_batch(local_batch)
        start = time.perf_counter()
        self.compiled = self.exp.train_step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.memory = {
            "trained params": first_device_bytes(self.state.params),
            "frozen params": first_device_bytes(self.state.frozen),
            "optimizer state": first_device_bytes(self.state.opt_state),
        }
        self.memory["state total"] = sum(self.memory.values())
        analysis = self.compiled.memory_analysis()
        self.memory["XLA step arguments"] = analysis.argument_size_in_bytes
        self.memory["XLA step temporaries"] = analysis.temp_size_in_bytes
        self.memory["XLA aliased in->out"] = analysis.alias_size_in_bytes
        self.model_params = jax.tree.map(jnp.copy, self.state.model_params)  # before training

    def steps(self, n: int) -> float:
        """Seconds per step over n back-to-back steps."""
        start = time.perf_counter()
        for _ in range(n):
            self.state, _ = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.state)
        return (time.perf_counter() - start) / n

    def logits(self, tokens):
        return nnx.merge(self.exp.graphdef, self.model_params)(tokens)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = {name: side_config(args, name) for name in SIDES}
    config = configs["full"]
    local_batch = next(iter(pipeline.make_train_iterator(config)))
    sides = [Side(name, configs[name], local_batch) for name in SIDES]
    full = sides[0]
    m, t = config.model, config.train
    print("lora_memory: full fine-tuning vs LoRA vs LoRA on an int8 base, same model and batch")
    devices = jax.devices()
    mesh = dict(full.exp.mesh.shape)
    print(f"device           : {devices[0].platform} x {len(devices)}, mesh {mesh}")
    print(f"versions         : jax {jax.__version__}")
    print(f"config           : {os.path.relpath(args.config, REPO_ROOT)} {' '.join(args.set)}")
    print(f"model            : d_model {m.d_model}, n_layers {m.n_layers}, d_ff {m.d_ff}, "
          f"vocab {m.vocab_size}; {full.exp.param_count():,} parameters")  # fmt: skip
    print(f"lora             : rank {args.rank}, alpha {config.model.lora.alpha}, "
          f"targets {args.targets}; {sides[1].exp.param_count():,} trained parameters")  # fmt: skip
    print(
        f"batch            : {t.batch_size} x {t.seq_len} tokens, optimizer {config.optimizer.name}"
    )
    print("compile time     : " + ", ".join(f"{s.name} {s.compile_s:.1f} s" for s in sides))

    tokens = jnp.asarray(local_batch["inputs"][:4])
    reference, int8 = full.logits(tokens), sides[2].logits(tokens)
    error = float(jnp.max(jnp.abs(int8 - reference)))
    scale = float(jnp.max(jnp.abs(reference)))
    agree = float(jnp.mean(jnp.argmax(int8, -1) == jnp.argmax(reference, -1)))
    print(f"int8 base logits : max |int8 - float| = {error:.4f} ({error / scale:.2%} of the "
          f"largest |logit|), argmax agrees on {agree:.1%} of tokens")  # fmt: skip

    names = [s.name for s in sides]
    header = "".join(f"{n:>14}" for n in names) + "".join(f"{'full/' + n:>16}" for n in names[1:])
    print(f"\n{'per-device bytes':<22}{header}")
    for key in full.memory:
        values = [s.memory[key] for s in sides]
        ratios = [
            f"{full.memory[key] / v:>16.2f}" if v and full.memory[key] else f"{'-':>16}"
            for v in values[1:]
        ]
        print(f"{key:<22}" + "".join(f"{v:>14,}" for v in values) + "".join(ratios))

    for side in sides:  # warm up: the first calls allocate and fill caches
        side.steps(1)
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else reversed(sides):
            times[side.name].append(side.steps(args.steps_per_round))
    print(f"\n{'step time':<14}{'ms median':>12}{'ms min':>10}  per block (ms)")
    for name, ts in times.items():
        blocks = " ".join(f"{1e3 * x:.1f}" for x in ts)
        print(f"{name:<14}{1e3 * statistics.median(ts):>12.1f}{1e3 * min(ts):>10.1f}  {blocks}")
    for name in names[1:]:
        per_round = [a / b for a, b in zip(times[name], times["full"], strict=True)]
        print(f"RATIO {name}/full step time = {statistics.median(per_round):.3f} "
              f"(median of per-round ratios)")  # fmt: skip
    state_ratio = full.memory["state total"] / sides[1].memory["state total"]
    opt_ratio = full.memory["optimizer state"] / sides[1].memory["optimizer state"]
    print(
        f"RATIO full/lora optimizer-state bytes = {opt_ratio:.1f}, state bytes = {state_ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
