"""Load throughput of `jtrain.interop.hf.load_model` on a sharded safetensors checkpoint.

Writes a random float32 Llama (about 170 MB, four shards plus model.safetensors.index.json,
written with safetensors.numpy, no torch needed) to a temporary directory, then alternates
timed rounds of:

- reference: `safetensors.numpy.load_file` of every shard (plain reads into host memory, no
  reshaping and no device transfer): the speed of reading these files on this machine.
- jtrain 1 device: `hf.load_model(dir)`, every parameter ready on one device.
- jtrain mesh: `hf.load_model(dir, mesh=..., rules=...)` over 8 fake CPU devices, each device
  reading only its own slices (data=2 x fsdp=2 x tensor=2 and fsdp=8, default rules).

It prints GB/s of checkpoint bytes for each (median of the rounds) and the ratio to the
reference. The files stay in the page cache between rounds, so this measures the loader's
own cost, not the disk.

    python benchmarks/hf_load.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` and `configs` without installing

import jax  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from jtrain import mesh as mesh_lib  # noqa: E402
from jtrain.interop import hf  # noqa: E402

CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=16_384,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rope_theta=500_000.0,
    tie_word_embeddings=False,
    torch_dtype="float32",
)
SHARDS = 4
MESHES = {"data=2 x fsdp=2 x tensor=2": (2, 2, 2), "fsdp=8": (1, 8, 1)}


def write_checkpoint(path: str) -> int:
    """A random Llama of CONFIG in SHARDS files (split by layer); returns its bytes."""
    c, rng = CONFIG, np.random.default_rng(0)
    d, f, v, k = c["hidden_size"], c["intermediate_size"], c["vocab_size"], 64
    h, g = c["num_attention_heads"], c["num_key_value_heads"]

    def w(*shape):
        return rng.standard_normal(shape, np.float32) * 0.02

    shards = [{} for _ in range(SHARDS)]
    shards[0]["model.embed_tokens.weight"] = w(v, d)
    shards[-1]["lm_head.weight"] = w(v, d)
    shards[-1]["model.norm.weight"] = np.ones(d, np.float32)
    layers_per_shard = -(-c["num_hidden_layers"] // SHARDS)
    for i in range(c["num_hidden_layers"]):
        p, shard = f"model.layers.{i}.", shards[i // layers_per_shard]
        shard[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        shard[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
        shard[p + "self_attn.q_proj.weight"] = w(h * k, d)
        shard[p + "self_attn.k_proj.weight"] = w(g * k, d)
        shard[p + "self_attn.v_proj.weight"] = w(g * k, d)
        shard[p + "self_attn.o_proj.weight"] = w(d, h * k)
        shard[p + "mlp.gate_proj.weight"] = w(f, d)
        shard[p + "mlp.up_proj.weight"] = w(f, d)
        shard[p + "mlp.down_proj.weight"] = w(d, f)
    weight_map, total = {}, 0
    for j, tensors in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{SHARDS:05d}.safetensors"
        safetensors.numpy.save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fp:
        json.dump(index, fp)
    with open(os.path.join(path, "config.json"), "w") as fp:
        json.dump(CONFIG, fp)
    return total


def reference(path: str) -> list[np.ndarray]:
    arrays = []
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            arrays += safetensors.numpy.load_file(os.path.join(path, name)).values()
    return arrays


def jtrain_load(path: str, **kwargs) -> list[jax.Array]:
    return jax.tree.leaves(nnx.state(hf.load_model(path, **kwargs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rules = mesh_lib.parse_rules(default.get_config().mesh.rules)
    modes = {"reference (safetensors.numpy)": reference, "jtrain 1 device": jtrain_load}
    for name, (data, fsdp, tensor) in MESHES.items():
        mesh = mesh_lib.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:8])
        modes[f"jtrain mesh {name}"] = lambda p, m=mesh: jtrain_load(p, mesh=m, rules=rules)

    path = tempfile.mkdtemp(prefix="hf_load_")
    try:
        nbytes = write_checkpoint(path)
        print("hf_load: hf.load_model of a sharded float32 Llama vs safetensors.numpy.load_file")
        print(f"devices          : {len(jax.devices())} x {jax.devices()[0].platform}")
        print(f"versions         : jax {jax.__version__}, safetensors {safetensors.__version__}")
        print(f"checkpoint       : {nbytes / 1e6:.1f} MB in {SHARDS} shards, {CONFIG}")
        for run in modes.values():  # warm-up: page cache, jit caches, imports
            jax.block_until_ready(run(path))
        times = {mode: [] for mode in modes}
        for r in range(args.rounds):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for mode in order:
                start = time.perf_counter()
                jax.block_until_ready(modes[mode](path))
                times[mode].append(time.perf_counter() - start)
        ref = times[next(iter(modes))]
        print("\nGB/s of checkpoint bytes; 'x ref' = reference time / this time (1 = as fast)")
        print(f"{'':40s}{'median s':>9s}{'GB/s':>7s}{'x ref':>7s}{'best s':>8s}{'x ref':>7s}")
        for mode, ts in times.items():
            t, best = statistics.median(ts), min(ts)
            ratios = f"{statistics.median(ref) / t:7.2f}{best:8.3f}{min(ref) / best:7.2f}"
            print(f"{mode:40s}{t:9.3f}{nbytes / t / 1e9:7.2f}{ratios}")
            print(f"{'':4s}per round (s): " + " ".join(f"{x:.3f}" for x in ts))
    finally:
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
