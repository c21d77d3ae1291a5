"""Device memory of the sampler's compiled programs against the model's weights, on XLA:CPU and,
compiled ahead of time, XLA:TPU (jtrain.aot; needs libtpu).

Decoding runs its layers unrolled, each with its own KV cache (jtrain/sampler.py). This checks
what that costs in memory at a size users run: XLA's temporaries of the prefill and the decode
loop, next to the weights' bytes and the KV cache's. A program whose temporaries hold another
copy of the weights shows it as temporaries at least the weights' size.

    python benchmarks/sampler_memory.py                       # a 270M-parameter Llama, f32
    python benchmarks/sampler_memory.py --set model.dtype=bfloat16 --rows 16 --prompt 128
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import overrides as overrides_lib  # noqa: E402
from jtrain import aot, sampler  # noqa: E402
from jtrain import config as config_lib  # noqa: E402
from jtrain.models import family_of  # noqa: E402

MODEL = (
    "model.d_model=1024 model.n_layers=16 model.d_ff=4096 model.n_heads=16 model.n_kv_heads=8 "
    "model.head_dim=64 model.vocab_size=32000"
).split()
MIB = 2**20


def temporaries(config, device, rows: int, prompt: int, new: int) -> dict[str, float]:
    """MiB: the weights, the KV cache, and XLA's temporaries of the prefill and decode loop."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    model = nnx.eval_shape(
        lambda: family_of(config.model).make(config.model, head="logits", rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(model)

    def on_device(tree):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
        )

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    args = (
        on_device(state), spec((rows, prompt), jnp.int32), spec((rows,), jnp.int32),
        spec((), jnp.int32), spec((1,), jnp.int32), spec((rows,), jnp.float32),
        spec((rows,), jnp.int32), spec((rows,), jnp.float32), spec((), jax.random.key(0).dtype),
    )  # fmt: skip
    prefill = functools.partial(sampler._prefill, graphdef=graphdef, new_bucket=new)
    loop = jax.eval_shape(prefill, *args)
    decode = jax.jit(functools.partial(sampler._decode, graphdef=graphdef), donate_argnums=1)
    prefill_memory = jax.jit(prefill).lower(*args).compile().memory_analysis()
    decode_memory = decode.lower(on_device(state), on_device(loop), spec((), jnp.int32))
    decode_memory = decode_memory.compile().memory_analysis()
    return {
        "weights": _bytes(state) / MIB,
        "kv cache": _bytes(loop.kv) / MIB,
        "prefill temporaries": prefill_memory.temp_size_in_bytes / MIB,
        "decode temporaries": decode_memory.temp_size_in_bytes / MIB,
    }


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _on_tpu(config_json: str, topology: str, rows: int, prompt: int, new: int):
    """`temporaries` on a TPU topology's first device (run in a child: `aot.in_child`)."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    return temporaries(config, aot.topology_devices(topology)[0], rows, prompt, new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE on the model")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--topology", default="v5e:2x2", help="'' skips the TPU compile")
    args = parser.parse_args()
    config = config_lib.load(os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"))
    overrides_lib.apply(config, [*MODEL, *args.set])
    shape = (args.rows, args.prompt, args.new)
    model = " ".join([*MODEL, *args.set])
    print(f"model: {model}; rows {shape[0]}, prompt {shape[1]}, new tokens {shape[2]}")
    results = {"XLA:CPU": temporaries(config, jax.devices("cpu")[0], *shape)}
    if args.topology:
        try:
            results[f"XLA:TPU {args.topology}"] = aot.in_child(
                _on_tpu, config.to_json(), args.topology, *shape
            )
        except aot.AotUnavailable as err:
            print(f"TPU: skipped ({err})")
    for backend, mib in results.items():
        print(f"{backend:18s} " + ", ".join(f"{k} {v:,.0f} MiB" for k, v in mib.items()))


if __name__ == "__main__":
    main()
