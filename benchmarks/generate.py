"""Generation speed of jtrain's batched KV-cache Sampler against transformers' `generate`.

One process, three parts:

1. Tokens/s of greedy generation at batch 1 and batch 16 on the SAME model and the same
   prompts (different lengths, left-padded): jtrain's `Sampler.generate` against
   `transformers.AutoModelForCausalLM.generate(do_sample=False, max_new_tokens=N,
   min_new_tokens=N)` with an attention mask, in torch on the CPU with
   `torch.set_num_threads(--torch_threads)`. The model (a freshly initialised one of
   --config's architecture, or a trained run's with --workdir) is written with
   `hf.save_model` to a temporary directory; transformers loads that directory, and jtrain
   loads it back with `hf.load_model`, so both sides hold identical float32 weights. Both
   sides are warmed up first (jtrain's compile time is reported on its own, not in tokens/s),
   their greedy tokens are compared, and then timed blocks alternate between the sides
   (A B, B A, ...) so that load from other processes hits both alike. Targets: the ratio of
   median tokens/s jtrain/transformers is > 1 at batch 1 and >= 3 at batch 16.
2. Decode time per token at batch 1 against the weight-bandwidth limit: the host memory
   bandwidth is measured here (a ~500 MB copy, bytes read + written per second) and the
   parameter bytes, which every decode step reads, divided by it is the least time a decode
   step can take. The measured time per decode step is the difference of two long greedy
   generations in the same shape bucket (--decode_tokens and about half as many new tokens),
   so prefill, compilation and dispatch cancel out.
3. Compilations: --requests requests of random prompt lengths (1..64), random max_new_tokens
   (1..64) and random batch sizes (1..8), sent one by one to a Sampler of --compile_config's
   (small) model. `Sampler.compilations()` (and the decode loop's programs: each bucket
   compiles a prefill and a decode loop) must equal the number of distinct shape buckets
   `(rows_bucket(batch), length_bucket(prompt), length_bucket(new))` the requests fall in.

Run from the repository root (no install needed):

    python benchmarks/generate.py
    python benchmarks/generate.py --workdir=runs/my_run --new_tokens=64 --rounds=3
    python benchmarks/generate.py --set model.d_model=512 --set model.n_layers=8 ...

It always exits 0; a ratio that misses its target is marked FAIL in the output.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` and `configs` without installing

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import overrides as overrides_lib  # noqa: E402
from jtrain import config as config_lib  # noqa: E402
from jtrain import runs  # noqa: E402
from jtrain.interop import hf  # noqa: E402
from jtrain.models import family_of  # noqa: E402
from jtrain.sampler import Sampler, fewest_in, length_bucket, rows_bucket  # noqa: E402

TARGETS = {1: (1.0, ">"), 16: (3.0, ">=")}  # batch -> (jtrain/transformers tokens/s, test)
BATCH = 16
BATCH1_PROMPTS = 4  # batch-1 blocks generate for this many of the prompts, one at a time
BANDWIDTH_BYTES = 500 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO_ROOT, "configs", "default.py"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, e.g. model.d_model=512 (repeatable)")  # fmt: skip
    p.add_argument("--workdir", help="benchmark this trained run's model instead of a fresh one")
    p.add_argument("--new_tokens", type=int, default=64, help="new tokens per prompt (part 1)")
    p.add_argument("--min_prompt", type=int, default=8, help="shortest prompt (part 1)")
    p.add_argument("--max_prompt", type=int, default=48, help="longest prompt (part 1)")
    p.add_argument("--rounds", type=int, default=3, help="timed blocks per side and batch")
    p.add_argument("--decode_tokens", type=int, default=256, help="long generation (part 2)")
    p.add_argument("--requests", type=int, default=100, help="part 3 requests (0 = skip)")
    p.add_argument("--compile_config", default=os.path.join(REPO_ROOT, "configs", "tiny.py"))
    p.add_argument("--torch_threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="seeds prompts and requests")
    args = p.parse_args(argv)
    for name in ("new_tokens", "min_prompt", "rounds", "decode_tokens", "torch_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_prompt < args.min_prompt:
        p.error("--max_prompt must be >= --min_prompt")
    return args


def load_config(path: str, overrides: list[str]):
    """The config file with --set overrides, validated as jtrain validates it."""
    config = overrides_lib.apply(config_lib.load(path), overrides)
    config_lib.validate(config)
    return config


def source_model(args) -> tuple[nnx.Module, str]:
    """The model to benchmark and a line saying where it came from."""
    if args.workdir:
        if args.set:
            print("WARNING: --set is ignored with --workdir (the run's model is used)")
        return runs.trained_model(args.workdir), f"trained run {args.workdir}"
    config = load_config(args.config, args.set)
    model = family_of(config.model).make(config.model, head="logits", rngs=nnx.Rngs(0))
    where = f"fresh init (nnx.Rngs(0)) of {os.path.relpath(args.config, REPO_ROOT)}"
    return model, " ".join([where, *args.set])


def param_bytes(model: nnx.Module) -> int:
    """Bytes of the model's parameters: what one decode step reads at least once."""
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def make_prompts(rng: np.random.Generator, vocab: int, lengths: list[int]) -> list[list[int]]:
    """Random prompts of the given lengths, ids below min(vocab, 256) (bytes)."""
    high = min(vocab, 256)
    return [rng.integers(0, high, n).tolist() for n in lengths]


class JtrainSide:
    """jtrain's Sampler: greedy `generate` over the prompts, tokens as an int array."""

    name = "jtrain"

    def __init__(self, model: nnx.Module):
        self.sampler = Sampler(model)

    def generate(self, prompts: list[list[int]], new: int) -> np.ndarray:
        out = self.sampler.generate(prompts, max_new_tokens=new)
        return np.stack([c.tokens for c in out])


class TorchSide:
    """transformers' `generate` on the same weights: left padding and an attention mask."""

    name = "transformers"

    def __init__(self, path: str):
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()

    def generate(self, prompts: list[list[int]], new: int) -> np.ndarray:
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,  # no early end on an EOS (the exported config has none)
                pad_token_id=0,
            )
        return out[:, width:].numpy()


def run_block(side, batches: list[list[list[int]]], new: int) -> tuple[float, list[np.ndarray]]:
    """Seconds to generate `new` tokens for every batch in turn, and the tokens."""
    start = time.perf_counter()
    tokens = [side.generate(prompts, new) for prompts in batches]
    return time.perf_counter() - start, tokens


def interleaved(sides, workloads: dict, new: int, rounds: int) -> dict[tuple[str, str], list]:
    """Seconds of each timed block per (side, workload), alternating A B, B A, ..."""
    times = {(side.name, w): [] for side in sides for w in workloads}
    for r in range(rounds):
        for w, batches in workloads.items():
            for side in sides if r % 2 == 0 else reversed(sides):
                times[side.name, w].append(run_block(side, batches, new)[0])
    return times


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, int, int]:
    """(fraction of identical tokens, rows identical, rows) of two sides' outputs."""
    a_rows = [row for x in a for row in x]
    b_rows = [row for x in b for row in x]
    same = sum(int(np.sum(x == y)) for x, y in zip(a_rows, b_rows, strict=True))
    total = sum(x.size for x in a_rows)
    rows = sum(bool(np.array_equal(x, y)) for x, y in zip(a_rows, b_rows, strict=True))
    return same / total, rows, len(a_rows)


def part_speed(args, jt: JtrainSide, pt: TorchSide, prompts: list[list[int]]) -> float:
    """Part 1: warm-up, greedy agreement, interleaved tokens/s and the RATIO lines. Returns
    transformers' median seconds per generated token at batch 1."""
    n = args.new_tokens
    step = max(1, (len(prompts) - 1) // (BATCH1_PROMPTS - 1))
    workloads = {
        "1": [[p] for p in prompts[::step][:BATCH1_PROMPTS]],
        str(BATCH): [prompts],
    }
    lengths = {w: [len(p) for b in batches for p in b] for w, batches in workloads.items()}
    print(f"prompts          : batch 16 lengths {lengths[str(BATCH)]}")
    print(f"                   batch 1 = {BATCH1_PROMPTS} calls, lengths {lengths['1']}")
    print(f"new tokens       : {n} per prompt (greedy, no stop tokens)")

    compile_s, outputs = {}, {}
    for w, batches in workloads.items():
        first, outputs["jtrain", w] = run_block(jt, batches, n)
        warm, _ = run_block(jt, batches, n)
        compile_s[w] = first - warm
        _, outputs["transformers", w] = run_block(pt, batches, n)  # warm-up
    buckets = sorted(jt.sampler.buckets)
    print(
        f"jtrain compile   : {sum(compile_s.values()):.1f} s (first call - warm call; "
        + ", ".join(f"batch {w} {s:.1f} s" for w, s in compile_s.items())
        + f"), {jt.sampler.compilations()} compilations, buckets (rows, prompt, new) {buckets}"
    )
    for w in workloads:
        frac, rows, total = agreement(outputs["jtrain", w], outputs["transformers", w])
        verdict = "OK" if rows == total else "DIFFERENT"
        print(f"greedy agreement : batch {w:>2}: {frac:.2%} of tokens identical, "
              f"{rows}/{total} rows identical  {verdict}")  # fmt: skip
    same = agreement(outputs["jtrain", "1"], [outputs["jtrain", str(BATCH)][0][::step]])
    print(f"jtrain batch 1 vs the same rows at batch {BATCH}: {same[0]:.2%} of tokens identical")

    times = interleaved([jt, pt], workloads, n, args.rounds)
    print(f"\ntimed            : {args.rounds} rounds per side and batch, interleaved")
    print(f"{'':<14}{'batch':>6}{'s/block median':>16}{'s/block min':>13}{'tokens/s':>11}"
          "  per block (s)")  # fmt: skip
    tokens_per_s = {}
    for (name, w), ts in times.items():
        tokens = sum(len(b) for b in workloads[w]) * n
        med = statistics.median(ts)
        tokens_per_s[name, w] = tokens / med
        blocks = " ".join(f"{t:.3f}" for t in ts)
        print(f"{name:<14}{w:>6}{med:>16.3f}{min(ts):>13.3f}{tokens / med:>11,.0f}  {blocks}")
    for batch in TARGETS:
        ratio_min = min(times["transformers", str(batch)]) / min(times["jtrain", str(batch)])
        print(f"min-based ratio jtrain/transformers tokens/s at batch {batch} = {ratio_min:.2f}")
    for batch, (target, test) in TARGETS.items():
        ratio = tokens_per_s["jtrain", str(batch)] / tokens_per_s["transformers", str(batch)]
        ok = ratio > target if test == ">" else ratio >= target
        print(f"RATIO jtrain/transformers tokens/s at batch {batch} = {ratio:.2f} "
              f"(target {test} {target:g})  {'OK' if ok else 'FAIL'}")  # fmt: skip
    return 1 / tokens_per_s["transformers", "1"]


def copy_bandwidth(nbytes: int, repeats: int = 7) -> dict[str, float]:
    """Bytes read + written per second of a copy of nbytes: numpy (one thread) and a donated
    jitted jax elementwise update (XLA:CPU's threads); median of alternating timings."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    x = jnp.ones(nbytes // 4, jnp.float32)
    update = jax.jit(lambda a: a * 1.0000001, donate_argnums=0)
    inner = max(1, (50 << 20) // nbytes)  # small buffers: repeat so a timing is >= ~50 MB

    def numpy_copy():
        for _ in range(inner):
            np.copyto(dst, src)

    def jax_copy():
        nonlocal x
        for _ in range(inner):
            x = update(x)
        x.block_until_ready()

    numpy_copy()
    jax_copy()  # page faults and compilation
    times: dict[str, list[float]] = {"numpy copy": [], "jax x*c (donated)": []}
    fns = list(zip(times, (numpy_copy, jax_copy), strict=True))
    for r in range(repeats):
        for name, fn in fns if r % 2 == 0 else reversed(fns):
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: 2 * nbytes / statistics.median(ts) for name, ts in times.items()}


def decode_step_times(side, prompt: list[int], long: int, short: int, rounds: int) -> list[float]:
    """Per-round seconds per decode step at batch 1: (t(long) - t(short)) / (long - short)."""
    side.generate([prompt], long)  # warm-up (compiles jtrain's bucket)
    side.generate([prompt], short)
    out = []
    for r in range(rounds):
        t = {}
        for n in (long, short) if r % 2 == 0 else (short, long):
            t[n] = run_block(side, [[prompt]], n)[0]
        out.append((t[long] - t[short]) / (long - short))
    return out


def part_bandwidth(args, jt: JtrainSide, model, prompt: list[int], torch_s: float) -> None:
    """Part 2: measured decode time per step at batch 1 against the weight-bandwidth limit.
    torch_s: transformers' seconds per generated token at batch 1 in part 1 (for context)."""
    weights = param_bytes(model)
    cfg = model.cfg
    long = args.decode_tokens
    short = fewest_in(length_bucket(long))
    if long - short < long // 4:
        short = 1  # too close to difference well: two buckets (their prefills differ a little)
    slots = length_bucket(len(prompt)) + length_bucket(long)
    kv_bytes = 2 * cfg.n_layers * slots * cfg.n_kv_heads * cfg.head_dim * 4  # float32 k and v
    print(f"\nparameter bytes  : {weights:,} ({weights / 2**20:.1f} MiB); KV cache read per step "
          f"at batch 1: {kv_bytes:,} ({slots} slots, all attended with a mask)")  # fmt: skip
    bw = copy_bandwidth(BANDWIDTH_BYTES)
    bw_small = copy_bandwidth(max(weights, 1 << 20))
    for name in bw:
        print(f"bandwidth        : {name:<18} {BANDWIDTH_BYTES >> 20} MiB {bw[name] / 1e9:6.1f} "
              f"GB/s; at the weights' size {bw_small[name] / 1e9:6.1f} GB/s")  # fmt: skip
    host_bw, small_bw = max(bw.values()), max(bw_small.values())
    limit = weights / host_bw
    cached = (weights + kv_bytes) / small_bw
    print(f"limit per step   : {1e3 * limit:.3f} ms = parameter bytes / {host_bw / 1e9:.1f} GB/s "
          f"(the faster {BANDWIDTH_BYTES >> 20} MiB copy); {1e3 * cached:.3f} ms = (parameter + "
          f"KV bytes) / {small_bw / 1e9:.1f} GB/s (copy at the weights' size)")  # fmt: skip
    per = decode_step_times(jt, prompt, long, short, args.rounds)
    med = statistics.median(per)
    print(f"decode timing    : batch 1, prompt of {len(prompt)} tokens, "
          f"(t({long} new) - t({short} new)) / {long - short}, {args.rounds} rounds: "
          + " ".join(f"{1e3 * t:.3f}" for t in per) + " ms")  # fmt: skip
    print(f"jtrain           : {1e3 * med:.3f} ms/step ({1 / med:,.0f} tokens/s), "
          f"{med / cached:.2f} x the (parameter + KV) / weights-size-bandwidth limit")  # fmt: skip
    print(f"transformers     : {1e3 * torch_s:.3f} ms per generated token at batch 1 in part 1 "
          f"(prefill included), {torch_s / limit:.1f} x the limit")  # fmt: skip
    print(
        f"RATIO jtrain decode time per step / weight-bandwidth limit = {med / limit:.2f} "
        "(1 = a step only streams the weights from memory)"
    )


def part_compilations(args) -> None:
    """Part 3: one compilation per shape bucket over a stream of random requests."""
    config = load_config(args.compile_config, [])
    model = family_of(config.model).make(config.model, head="logits", rngs=nnx.Rngs(0))
    sampler = Sampler(model)
    rng = np.random.default_rng(args.seed + 1)
    buckets, tokens = set(), 0
    start = time.perf_counter()
    for _ in range(args.requests):
        rows = int(rng.integers(1, 9))
        lengths = rng.integers(1, 65, rows).tolist()
        new = int(rng.integers(1, 65))
        temperature = rng.choice([0.0, 0.7], rows).tolist()  # per-row settings: no new shapes
        prompts = make_prompts(rng, config.model.vocab_size, lengths)
        out = sampler.generate(prompts, max_new_tokens=new, temperature=temperature)
        tokens += sum(len(c.tokens) for c in out)
        buckets.add((rows_bucket(rows), length_bucket(max(lengths)), length_bucket(new)))
    seconds = time.perf_counter() - start
    n = sampler.compilations()
    decode_programs = sampler._decode._cache_size()  # each bucket: a prefill and a decode loop
    print(f"\ncompilations     : {args.requests} requests (batch 1..8, prompts 1..64, new 1..64, "
          f"temperature 0 or 0.7 per row) on {os.path.relpath(args.compile_config, REPO_ROOT)}'s "
          f"model, {seconds:.1f} s in all, {tokens:,} tokens")  # fmt: skip
    same = n == decode_programs == len(buckets) and sampler.buckets == buckets
    print(f"programs         : {n} prefill, {decode_programs} decode loop")
    verdict = "OK" if same else "FAIL"
    print(f"COMPILATIONS {n} for {len(buckets)} distinct buckets (rows, prompt, new)  {verdict}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    transformers.logging.set_verbosity_error()
    source, where = source_model(args)
    cfg = source.cfg
    rng = np.random.default_rng(args.seed)
    lengths = np.linspace(args.min_prompt, args.max_prompt, BATCH).round().astype(int).tolist()
    prompts = make_prompts(rng, cfg.vocab_size, lengths)
    longest = max(args.max_prompt + args.new_tokens, 64 + args.decode_tokens)
    if cfg.max_seq_len and longest > cfg.max_seq_len:
        print(f"WARNING: prompts + new tokens ({longest}) exceed max_seq_len {cfg.max_seq_len}")

    print("generate: jtrain Sampler vs transformers generate (same weights, greedy, CPU)")
    device = jax.devices()[0]
    print(f"device           : {device.platform} ({device}), {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    print(f"versions         : jax {jax.__version__}, flax {flax.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}")  # fmt: skip
    print(f"threads          : torch.set_num_threads({args.torch_threads}); XLA:CPU default")
    print(f"model            : {where}")
    print(f"                   d_model {cfg.d_model}, n_layers {cfg.n_layers}, heads "
          f"{cfg.n_heads}/{cfg.n_kv_heads} kv x {cfg.head_dim}, d_ff {cfg.d_ff}, vocab "
          f"{cfg.vocab_size}; {param_bytes(source) // 4:,} parameters, float32")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hf")
        start = time.perf_counter()
        hf.save_model(source, path, max_position_embeddings=None if cfg.max_seq_len else 4096)
        jt = JtrainSide(hf.load_model(path))
        pt = TorchSide(path)
        model_type = pt.model.config.model_type
        print(f"export           : hf.save_model -> {model_type} directory, loaded by "
              f"transformers and hf.load_model in {time.perf_counter() - start:.1f} s")  # fmt: skip
    torch_s = part_speed(args, jt, pt, prompts)
    part_bandwidth(args, jt, source, prompts[0], torch_s)
    if args.requests:
        part_compilations(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
