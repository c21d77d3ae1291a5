"""Framework overhead of jtrain's train step: its jitted step against a bare `jax.jit` step.

Both sides train the same Transformer (same config, same initial parameters), with the same
optax optimizer, on the same fixed batch, on the same single device, in one process:

- jtrain: `Experiment.from_config(config).train_step(state, batch)`, exactly what the
  training loop calls (TrainState in and out with shardings and donation, metrics out).
- bare: a step written here with nothing from jtrain's step, experiment or loop code:
  `nnx.merge` + a hand-written masked-mean cross-entropy, `jax.value_and_grad`,
  `tx.update`, `optax.apply_updates`, under `jax.jit` with params and optimizer state donated.

Both are compiled and warmed up first, and their losses over the warm-up steps are compared
(they must agree to float rounding, which shows the two steps compute the same thing). Then
timed blocks of `--steps_per_round` steps alternate between the sides (A B, B A, ...), each
ending in `jax.block_until_ready`, so load from other processes hits both alike. The report
gives median and min per-step times and the ratio jtrain/bare; the target is <= 1.05.

Run from the repository root (no install needed):

    python benchmarks/step_overhead.py
    python benchmarks/step_overhead.py --config configs/tiny.py --rounds 3 --steps_per_round 20

It always exits 0; a ratio above the target is marked FAIL in the output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` and `configs` without installing

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jtrain.config  # noqa: E402
from jtrain.data import pipeline  # noqa: E402
from jtrain.experiment import Experiment  # noqa: E402
from jtrain.models.transformer import Transformer, TransformerConfig  # noqa: E402
from jtrain.optim import make_optimizer  # noqa: E402

TARGET = 1.05
COST_KEYS = {
    "flops": "XLA flops",
    "transcendentals": "XLA transcend.",
    "bytes accessed": "XLA bytes",
}
LOSS_RTOL = 1e-5  # float32 rounding between two formulations of the same loss is ~1e-7


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; config values not given keep the config file's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "default.py"))
    p.add_argument("--batch_size", type=int, help="override config.train.batch_size")
    p.add_argument("--seq_len", type=int, help="override config.train.seq_len")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side (>= 1)")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks per side")
    p.add_argument("--steps_per_round", type=int, default=5, help="steps in each timed block")
    args = p.parse_args(argv)
    for name in ("warmup", "rounds", "steps_per_round"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def load_config(args: argparse.Namespace):
    """The config file with the command-line overrides, validated as jtrain validates it."""
    config = jtrain.config.load(args.config)
    if args.batch_size is not None:
        config.train.batch_size = args.batch_size
    if args.seq_len is not None:
        config.train.seq_len = args.seq_len
    jtrain.config.validate(config)
    if config.model.dropout > 0 or config.train.microbatches != 1:
        print(
            "WARNING: the bare step has no dropout and no micro-batching; with "
            f"model.dropout={config.model.dropout} and train.microbatches="
            f"{config.train.microbatches} the two steps do different work.",
            flush=True,
        )
    return config


def masked_mean_xent(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array):
    """Mean next-token cross-entropy over the positions where mask is 1."""
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
    mask = mask_BxL.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_bare_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> Callable:
    """(params, opt_state, batch) -> (params, opt_state, loss), jitted with donation."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        logits = model(
            batch["inputs"],
            positions_BxL=batch.get("positions"),  # packed rows: documents attend only
            segment_ids_BxL=batch.get("segment_ids"),  # within themselves
        )
        return masked_mean_xent(logits, batch["targets"], batch["loss_weight"])

    @jax.jit(donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


class JtrainSide:
    """jtrain's compiled train step on its TrainState."""

    name = "jtrain"

    def __init__(self, config, device: jax.Device, local_batch: dict[str, np.ndarray]):
        # One device, as the bare side: the comparison is framework overhead, not scaling.
        self.exp = Experiment.from_config(config, devices=[device])
        self.state = self.exp.init_state()
        self.batch = self.exp.global_batch(local_batch)

    def lower(self):
        return self.exp.train_step.lower(self.state, self.batch)

    def step(self) -> jax.Array:
        self.state, metrics = self.exp.train_step(self.state, self.batch)
        return metrics["loss"]

    def sync(self) -> None:
        jax.block_until_ready(self.state)


class BareSide:
    """The hand-written step on the same model, optimizer and batch."""

    name = "bare"

    def __init__(self, config, device: jax.Device, local_batch: dict[str, np.ndarray]):
        # jtrain's init splits the seed key into (params, dropout) keys; use the same params key.
        params_key, _ = jax.random.split(jax.random.key(config.seed))
        with jax.default_device(device):
            model = Transformer(
                TransformerConfig.from_mapping(config.model), rngs=nnx.Rngs(params=params_key)
            )
            graphdef, self.params = nnx.split(model, nnx.Param)
            tx, _ = make_optimizer(config.optimizer, config.schedule, config.train.steps)
            self.opt_state = tx.init(self.params)
        self.batch = jax.device_put(local_batch, device)
        self._step = make_bare_step(graphdef, tx)

    def lower(self):
        return self._step.lower(self.params, self.opt_state, self.batch)

    def step(self) -> jax.Array:
        self.params, self.opt_state, loss = self._step(self.params, self.opt_state, self.batch)
        return loss

    def sync(self) -> None:
        jax.block_until_ready((self.params, self.opt_state))


def max_param_diff(a, b) -> float:
    """Largest absolute difference between two parameter trees with the same leaves."""
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def compile_step(side) -> tuple[float, dict[str, float]]:
    """Compiles the side's step (later calls reuse it); returns (seconds, XLA cost analysis)."""
    start = time.perf_counter()
    cost = side.lower().compile().cost_analysis()
    seconds = time.perf_counter() - start
    return seconds, (cost[0] if isinstance(cost, list) else cost) or {}


def warm_up(side, steps: int) -> list[float]:
    """Runs `steps` untimed steps and returns their losses."""
    losses = [side.step() for _ in range(steps)]
    side.sync()
    return [float(x) for x in losses]


def time_block(side, steps: int) -> float:
    """Seconds per step over `steps` back-to-back steps, dispatched as the loop does."""
    start = time.perf_counter()
    for _ in range(steps):
        side.step()
    side.sync()
    return (time.perf_counter() - start) / steps


def interleaved_times(sides, rounds: int, steps: int) -> dict[str, list[float]]:
    """Per-step seconds of each timed block, alternating A B, B A, ... to cancel drift."""
    times: dict[str, list[float]] = {side.name: [] for side in sides}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else reversed(sides):
            times[side.name].append(time_block(side, steps))
    return times


def report_compile(jt: tuple[float, dict], bare: tuple[float, dict]) -> None:
    """Prints compile times and what XLA counts as the work of each compiled step."""
    print(f"compile time     : jtrain {jt[0]:.1f} s, bare {bare[0]:.1f} s")
    for key, label in COST_KEYS.items():
        a, b = jt[1].get(key), bare[1].get(key)
        if a and b:
            change = 100 * (a / b - 1)
            print(f"{label:<17}: jtrain {a:,.0f}  bare {b:,.0f}  ({change:+.2f}%)")


def report_check(jt_losses: list[float], bare_losses: list[float]) -> None:
    """Prints the warm-up losses of both sides and whether they agree."""
    for i in sorted({0, len(jt_losses) - 1}):
        a, b = jt_losses[i], bare_losses[i]
        rel = abs(a - b) / max(abs(b), 1e-30)
        verdict = "OK" if rel <= LOSS_RTOL else f"MISMATCH (> {LOSS_RTOL:g})"
        label = "first-step loss" if i == 0 else f"loss at step {i + 1}"
        print(f"{label:<17}: jtrain {a:.7f}  bare {b:.7f}  rel diff {rel:.1e}  {verdict}")


def report_times(times: dict[str, list[float]], tokens: int) -> None:
    """Prints the timing table and the final RATIO line."""
    print(f"\n{'':<8}{'ms/step median':>16}{'ms/step min':>14}{'tokens/s':>12}  per block (ms)")
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        blocks = " ".join(f"{1e3 * t:.1f}" for t in ts)
        print(f"{name:<8}{1e3 * med:>16.1f}{1e3 * low:>14.1f}{tokens / med:>12,.0f}  {blocks}")
    ratio = statistics.median(times["jtrain"]) / statistics.median(times["bare"])
    ratio_min = min(times["jtrain"]) / min(times["bare"])
    print(f"min-based ratio jtrain/bare = {ratio_min:.3f}")
    verdict = "" if ratio <= TARGET else "  FAIL"
    print(f"RATIO jtrain/bare = {ratio:.3f} (target <= {TARGET}){verdict}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args)
    device = jax.devices()[0]
    local_batch = next(iter(pipeline.make_train_iterator(config)))
    jt = JtrainSide(config, device, local_batch)
    bare = BareSide(config, device, local_batch)
    tokens = config.train.batch_size * config.train.seq_len

    print("step_overhead: jtrain train_step vs a bare jax.jit step (same model/optimizer/batch)")
    print(f"device           : {device.platform} / {device.device_kind} ({device}), 1 device")
    versions = f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}"
    print(f"versions         : {versions}")
    print(f"config           : {os.path.relpath(args.config)}")
    print(f"model params     : {jt.exp.param_count():,}")
    print(f"tokens per step  : {tokens:,} ({config.train.batch_size} x {config.train.seq_len})")
    diff = max_param_diff(jt.state.params, bare.params)
    print(f"initial params   : max |jtrain - bare| = {diff:g}")
    report_compile(compile_step(jt), compile_step(bare))
    report_check(warm_up(jt, args.warmup), warm_up(bare, args.warmup))
    print(f"timed            : {args.rounds} rounds x {args.steps_per_round} steps per side")
    times = interleaved_times([jt, bare], args.rounds, args.steps_per_round)
    report_times(times, tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
