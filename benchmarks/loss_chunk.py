"""The chunked LM head and loss (`model.loss_chunk`) against the whole batch's logits at once.

Both sides are jtrain's own compiled train step (`Experiment.train_step`, what the loop calls)
on the same model, initial parameters and batch, on one device; only `model.loss_chunk`
differs. Reported, each side against the other measured in the same run:

- XLA's memory analysis of the compiled step: temporary buffers (activations, logits and
  their gradients) — what chunking is for: a [tokens, vocab] float32 logits array and its
  gradient no longer exist at once;
- the step time (median of interleaved timed blocks, A B B A ..., so load hits both alike);
- the losses of the warm-up steps, which must agree to float rounding.

The default shape makes the head matter as it does for Llama 3 (128,256-token vocabulary):
a 32,768-token vocabulary over 4 x 512 positions, 256 MiB of float32 logits, against a
small trunk. Run from the repository root:

    python benchmarks/loss_chunk.py [--vocab 32768 --batch 4 --seq_len 512 --chunk 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jtrain.config  # noqa: E402
from jtrain.experiment import Experiment  # noqa: E402

MiB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--chunk", type=int, default=128, help="model.loss_chunk of the chunked side")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps_per_round", type=int, default=3)
    return p.parse_args(argv)


def make_config(args, loss_chunk: int):
    config = jtrain.config.load(os.path.join(REPO_ROOT, "configs", "default.py"))
    m = config.model
    m.vocab_size, m.d_model, m.n_layers = args.vocab, args.d_model, args.n_layers
    m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff = 4, 2, args.d_model // 4, 3 * args.d_model
    m.loss_chunk = loss_chunk
    config.train.batch_size, config.train.seq_len = args.batch, args.seq_len
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    jtrain.config.validate(config)
    return config


class Side:
    """jtrain's compiled train step for one value of model.loss_chunk."""

    def __init__(self, args, loss_chunk: int, batch: dict[str, np.ndarray]):
        self.name = f"loss_chunk={loss_chunk}"
        device = jax.devices()[0]
        self.exp = Experiment.from_config(make_config(args, loss_chunk), devices=[device])
        self.state = self.exp.init_state()
        self.batch = self.exp.global_batch(batch)
        compiled = self.exp.train_step.lower(self.state, self.batch).compile()
        self.temp_bytes = compiled.memory_analysis().temp_size_in_bytes

    def steps(self, n: int) -> list[float]:
        losses = []
        for _ in range(n):
            self.state, metrics = self.exp.train_step(self.state, self.batch)
            losses.append(metrics["loss"])
        jax.block_until_ready(self.state)
        return [float(x) for x in losses]


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len + 1), dtype=np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_weight": np.ones((args.batch, args.seq_len), np.float32),
    }
    whole, chunked = Side(args, 0, batch), Side(args, args.chunk, batch)
    logits_mib = args.batch * args.seq_len * args.vocab * 4 / MiB
    print(f"device: {jax.devices()[0].device_kind}; vocab {args.vocab}, batch {args.batch} x "
          f"{args.seq_len}, d_model {args.d_model}, {args.n_layers} layers: float32 logits "
          f"{logits_mib:.0f} MiB", flush=True)  # fmt: skip
    warm = [side.steps(2) for side in (whole, chunked)]
    np.testing.assert_allclose(warm[1], warm[0], rtol=1e-5)  # the same training, to rounding
    times: dict[str, list[float]] = {whole.name: [], chunked.name: []}
    for r in range(args.rounds):
        for side in (whole, chunked) if r % 2 == 0 else (chunked, whole):
            start = time.perf_counter()
            side.steps(args.steps_per_round)
            times[side.name].append((time.perf_counter() - start) / args.steps_per_round)
    result = {
        "temp_mib_whole": whole.temp_bytes / MiB,
        "temp_mib_chunked": chunked.temp_bytes / MiB,
        "memory_ratio": chunked.temp_bytes / whole.temp_bytes,
        "step_s_whole": statistics.median(times[whole.name]),
        "step_s_chunked": statistics.median(times[chunked.name]),
    }
    result["time_ratio"] = result["step_s_chunked"] / result["step_s_whole"]
    print(f"warm-up losses agree: {warm[0]} vs {warm[1]}")
    print(f"compiled step temporaries: {result['temp_mib_whole']:.1f} MiB whole, "
          f"{result['temp_mib_chunked']:.1f} MiB in chunks of {args.chunk} positions: "
          f"ratio {result['memory_ratio']:.3f}")  # fmt: skip
    print(f"step time (median of {args.rounds} blocks): {result['step_s_whole'] * 1e3:.1f} ms "
          f"whole, {result['step_s_chunked'] * 1e3:.1f} ms chunked: ratio "
          f"{result['time_ratio']:.3f}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
