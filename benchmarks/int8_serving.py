"""Weight-only int8 for serving: weight memory and validation loss against the float model.

    python benchmarks/int8_serving.py [--workdir=runs/default]

Loads a trained run (train the default one first: `python -m jtrain.main
--config=configs/default.py --workdir=runs/default`), quantizes a copy with
`jtrain.models.int8.quantize` (projection kernels and embedding tables to int8 with float32
per-channel scales), and reports, for both models in one process: the bytes of their weights,
the token-weighted validation loss over the whole split, and greedy decode tokens/s at batch
16. Targets: weights about 4x smaller, validation loss within 1% (relative). Always exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jtrain import runs  # noqa: E402
from jtrain.data import pipeline  # noqa: E402
from jtrain.models import int8  # noqa: E402
from jtrain.sampler import Sampler  # noqa: E402
from jtrain.tasks.lm import LMTask  # noqa: E402


def val_loss(model, config) -> float:
    """Token-weighted loss of `model` over the whole validation split."""
    task = LMTask(config)
    graphdef, state = nnx.split(model)

    @jax.jit
    def sums(state, batch):
        out = task.loss(nnx.merge(graphdef, state), batch, dropout_rng=None, frozen={})
        return out.loss_sum, out.weight

    total, weight = 0.0, 0.0
    for batch in pipeline.eval_batches(config, "val", task=task):
        loss_sum, w = sums(state, {k: jnp.asarray(v) for k, v in batch.items()})
        total, weight = total + float(loss_sum), weight + float(w)
    return total / weight


def decode_rate(model, new_tokens: int) -> float:
    """Greedy tokens/s at batch 16 (compilation excluded)."""
    sampler = Sampler(model)
    prompts = [[257] + [97 + (i * 7 + j) % 26 for j in range(8 + i)] for i in range(16)]
    sampler.generate(prompts, max_new_tokens=new_tokens)  # compile
    start = time.perf_counter()
    sampler.generate(prompts, max_new_tokens=new_tokens)
    return 16 * new_tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=os.path.join(REPO_ROOT, "runs", "default"))
    p.add_argument("--new_tokens", type=int, default=64)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
        print(f"{args.workdir} is not a trained run; train one first (see the docstring).")
        return
    config = runs.run_config(args.workdir)
    model = runs.trained_model(args.workdir)
    quantized = int8.quantize(nnx.clone(model))
    f32_bytes, int8_bytes = int8.weight_bytes(model), int8.weight_bytes(quantized)
    f32_loss, int8_loss = val_loss(model, config), val_loss(quantized, config)
    f32_rate = decode_rate(model, args.new_tokens)
    int8_rate = decode_rate(quantized, args.new_tokens)
    relative = (int8_loss - f32_loss) / f32_loss
    print(f"run              : {args.workdir}")
    print(f"device           : {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"weight bytes     : float32 {f32_bytes:,}  int8 {int8_bytes:,}")
    print(f"val loss         : float32 {f32_loss:.6f}  int8 {int8_loss:.6f}")
    print(f"decode tokens/s  : float32 {f32_rate:,.0f}  int8 {int8_rate:,.0f} (batch 16)")
    ok_bytes = "OK" if f32_bytes / int8_bytes >= 3.5 else "FAIL"
    ok_loss = "OK" if abs(relative) <= 0.01 else "FAIL"
    print(f"RATIO float32/int8 weight bytes = {f32_bytes / int8_bytes:.2f} (target ~4) {ok_bytes}")
    print(f"RELATIVE val loss change = {relative:+.2e} (target within 1%) {ok_loss}")
    print(f"RATIO int8/float32 decode tokens/s = {int8_rate / f32_rate:.3f}")


if __name__ == "__main__":
    main()
