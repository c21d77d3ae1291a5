"""Model FLOPs utilisation of jtrain's train step for a 1B-class Llama on one device.

The model has Llama-3.2-1B's shape (vocabulary 128,256, width 2048, 16 layers, 32 query and
8 key/value heads of 64, SwiGLU 8192, tied embeddings, RoPE theta 500,000 with llama3
scaling), random weights, sequences of 2048 tokens. The step is the trainer's own: a config
from configs/default.py with these overrides, `Experiment.from_config`, and its `train_step`
lowered and compiled as the loop compiles it, fed synthetic token batches (no data pipeline).

It sweeps model.dtype (bfloat16, float32), model.attention (cudnn where it can run, xla),
model.loss_chunk (a chunk, 0) and model.remat (none, dots, full), most promising first. For
each combination it finds the largest power-of-two batch that fits (benchmarks/mfu_batch.py),
runs warm-up steps, then times `--steps` steps, and prints one line: batch, step time,
tokens/s, model FLOP/s, MFU against the datasheet's peak and against a matmul of the same
dtype timed on the device in the same run, XLA's own FLOP count over ours, the memory XLA
says the step needs, the loss, and the compiles it took. The model FLOPs are the trainer's
(`Task.flops_per_example`: 6 per weight per token plus attention, PaLM's count; remat's
recomputation is not model FLOPs). XLA's cost analysis counts a loop's body once, which is
one scanned block (and one loss chunk), so next to the raw ratio it prints the ratio to our
count taken the same way: about 1, above it by remat's recomputation and the optimizer, below
it with cuDNN attention (a custom call XLA counts as 0 FLOPs). Last comes the best by tokens/s.

The sweep stops starting combinations once the next one would end past `--budget_s` (from the
mean time of those done) and names the ones it skipped. On a CPU backend the shape shrinks
(`--shape=cpu`: width 128, 2 layers, vocabulary 2048, sequences of 256) so CI can run it.

    python benchmarks/mfu.py                      # on a GPU or TPU: the 1B shape
    python benchmarks/mfu.py --write              # also benchmarks/results/mfu_<device>.txt
    python benchmarks/mfu.py --only dtype=bfloat16 remat=none,dots --steps=10

Exits 0 unless a combination failed with an unexpected error (it is printed, the sweep goes
on); a combination that cannot run on the device or does not fit is reported, not a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import re
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` and `benchmarks` without installing

import flax  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402

from benchmarks import mfu_flops  # noqa: E402
from benchmarks.mfu_step import GIB, Bench, Combination, Result, Shape, build_config  # noqa: E402
from jtrain import xla_flags  # noqa: E402
from jtrain.experiment import Experiment  # noqa: E402
from jtrain.models import attention_impl  # noqa: E402

TARGET_MFU = 0.50  # issue 18: bfloat16 on one H100/H200, against the datasheet's peak
LLAMA3_ROPE = {
    "model.rope_theta": 500_000.0,
    "model.rope_scaling": "llama3",
    "model.rope_factor": 32.0,
    "model.rope_low_freq_factor": 1.0,
    "model.rope_high_freq_factor": 4.0,
    "model.rope_original_max_len": 8192,
}
SHAPES = {
    "llama3_1b": Shape(
        "Llama-3.2-1B's shape, random weights",
        {
            "model.vocab_size": 128_256,
            "model.d_model": 2048,
            "model.n_layers": 16,
            "model.n_heads": 32,
            "model.n_kv_heads": 8,
            "model.head_dim": 64,
            "model.d_ff": 8192,
            "model.tie_embeddings": True,
            **LLAMA3_ROPE,
            "train.seq_len": 2048,
        },
        loss_chunk=512,
        max_batch=64,
        matmul_n=8192,
    ),
    "cpu": Shape(
        "the 1B recipe shrunk for a CPU",
        {
            "model.vocab_size": 2048,
            "model.d_model": 128,
            "model.n_layers": 2,
            "model.n_heads": 4,
            "model.n_kv_heads": 2,
            "model.head_dim": 32,
            "model.d_ff": 512,
            "model.tie_embeddings": True,
            **LLAMA3_ROPE,
            "train.seq_len": 256,
        },
        loss_chunk=64,
        max_batch=8,
        matmul_n=1024,
    ),
}
# The sweep's axes, most promising value first (loss_chunk's None is the shape's chunk).
AXES = {
    "dtype": ("bfloat16", "float32"),
    "attention": ("cudnn", "xla"),
    "loss_chunk": (None, 0),
    "remat": ("none", "dots", "full"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the shape's settings fill the ones not given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, help="default: cpu on a CPU backend, else llama3_1b")
    p.add_argument("--steps", type=int, default=5, help="timed steps per combination")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--max_batch", type=int, help="largest batch tried (default: the shape's)")
    p.add_argument("--loss_chunk", type=int, help="the non-zero model.loss_chunk swept")
    p.add_argument("--budget_s", type=float, default=420.0, help="start no combination after")
    p.add_argument(
        "--only",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=V1,V2",
        help=f"restrict the sweep; keys: {', '.join(AXES)}",
    )
    p.add_argument("--write", nargs="?", const="", help="also write the output (default path)")
    p.add_argument("--compile_cache", default="", help="jax's persistent compile cache dir")
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "max_batch", "loss_chunk"):
        value, least = getattr(args, name), 0 if name == "warmup" else 1
        if value is not None and value < least:
            p.error(f"--{name}={value} is invalid: it must be >= {least}")
    try:
        args.only = parse_only(args.only)
    except ValueError as err:
        p.error(str(err))
    return args


def parse_only(items: list[str]) -> dict[str, tuple]:
    """`KEY=V1,V2` items -> the values allowed per sweep axis (an axis not named: all)."""
    only = {}
    for item in items:
        key, _, values = item.partition("=")
        if key not in AXES or not values:
            raise ValueError(f"--only {item!r}: write KEY=V1,V2 with KEY one of {', '.join(AXES)}")
        if key == "loss_chunk":
            if not all(v.isdigit() for v in values.split(",")):
                raise ValueError(f"--only {item!r}: loss_chunk values are integers >= 0")
            only[key] = tuple(int(v) for v in values.split(","))
            continue
        bad = [v for v in values.split(",") if v not in AXES[key]]
        if bad:
            allowed = ", ".join(AXES[key])
            raise ValueError(f"--only {item!r}: {bad[0]!r} is not a {key}; allowed: {allowed}")
        only[key] = tuple(values.split(","))
    return only


def plan(only: dict[str, tuple], chunk: int, platform: str) -> list[Combination]:
    """The combinations to run, most promising first: bfloat16, then the attention that is
    fastest where it runs (cuDNN's fused kernel on a GPU), the chunked loss, remat none."""
    axes = dict(AXES, loss_chunk=(chunk, 0))
    if platform != "gpu":
        axes["attention"] = ("xla", "cudnn")
    for key, values in only.items():
        kept = tuple(v for v in axes[key] if v in values)
        axes[key] = kept + tuple(v for v in values if v not in kept)  # a loss_chunk of one's own
    return [Combination(*values) for values in itertools.product(*axes.values())]


def skip_reason(combo: Combination, accel: attention_impl.Device, head_dim: int) -> str | None:
    """Why the combination cannot run here (jtrain's own check for cuDNN); None if it can."""
    if combo.attention != "cudnn":
        return None
    why = attention_impl.cudnn_unsupported(accel, dtype=combo.dtype, head_dim=head_dim)
    return None if why is None else f"cuDNN attention cannot run: {why}"


def sweep(bench: Bench, combos: list[Combination], skip, budget_s: float, start: float, emit):
    """Measures the combinations in order, but those `skip` gives a reason not to; returns
    (results, how many failed)."""
    results, failures, durations, out_of_time = [], 0, [], None
    for combo in combos:
        reason = skip(combo)
        used = time.perf_counter() - start
        if not reason and not out_of_time and durations:
            per_combination = statistics.mean(durations)
            if used + per_combination > budget_s:
                out_of_time = f"--budget_s={budget_s:g} spent ({used:.0f} s used, about "
                out_of_time += f"{per_combination:.0f} s per combination)"
        if reason or out_of_time:
            emit(f"{combo.label:<39} | skipped: {reason or out_of_time}")
            continue
        began = time.perf_counter()
        try:
            outcome = bench.measure(combo)
        except Exception as err:  # one broken combination is reported; the sweep goes on
            failures += 1
            first_line = (str(err).strip().splitlines() or [""])[0][:300]
            emit(f"{combo.label:<39} | FAILED: {type(err).__name__}: {first_line}")
        else:
            if isinstance(outcome, Result):
                results.append(outcome)
                emit(outcome.line())
            else:
                emit(f"{combo.label:<39} | {outcome}")
        durations.append(time.perf_counter() - began)
    return results, failures


def header(bench: Bench, shape_name: str, combos: list[Combination], runnable: int, args, emit):
    """What ran where: device, versions, model size, peaks, sweep settings."""
    device, shape = bench.device, bench.shape
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    memory = f"memory limit {limit / GIB:.1f} GiB" if limit else "no memory limit reported"
    # Any combination has the model's size and FLOPs; XLA attention builds everywhere.
    config = build_config(shape, dataclasses.replace(combos[0], attention="xla"))
    exp = Experiment.from_config(config, devices=[device])
    seq_len = exp.config.train.seq_len
    per_token = exp.task.flops_per_example() / seq_len
    emit(f"mfu: jtrain's train step on one device, {shape.description} (--shape={shape_name})")
    emit(f"device         : {device.platform} / {device.device_kind} ({device}), {memory}")
    emit(
        f"versions       : jax {jax.__version__}, flax {flax.__version__}, optax "
        f"{optax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    emit(
        f"model          : {exp.param_count():,} parameters, sequences of {seq_len}, "
        f"{per_token / 1e9:.4g} GFLOP per token per train step (6 per weight + attention)"
    )
    n = shape.matmul_n
    for dtype, (nominal, measured) in bench.peaks.items():
        note = mfu_flops.F32_NOTE.get(device.platform) if dtype == "float32" else None
        nominal_text = f"{nominal / 1e12:,.1f} TFLOP/s" if nominal else "n/a"
        emit(
            f"peak {dtype:<10}: nominal {nominal_text}{f' ({note})' if note else ''}; measured "
            f"{measured / 1e12:,.4g} TFLOP/s ({n}x{n}x{n} matmul, this run)"
        )
    once = "yes" if mfu_flops.xla_counts_loop_body_once() else "no"
    emit(f"XLA FLOPs      : counts a loop body once: {once} ('as counted' follows this)")
    emit(
        f"timing         : largest power-of-two batch <= {bench.cap} that fits; {args.warmup} "
        f"warm-up + {args.steps} timed steps; {runnable} of {len(combos)} combinations can run "
        f"here; budget {args.budget_s:g} s"
    )


def report_best(results: list[Result], emit) -> None:
    """The fastest combination, the ratio to the same run's matmul, and issue 18's target."""
    if not results:
        emit("BEST: no combination ran")
        return
    best = max(results, key=lambda r: r.tokens_per_s)
    emit(f"BEST  {best.line()}")
    emit(f"RATIO best step FLOP/s / same-run {best.combo.dtype} matmul = {best.mfu_measured:.3f}")
    bf16 = [r for r in results if r.combo.dtype == "bfloat16" and r.mfu_nominal is not None]
    if not bf16:
        emit("target: no bfloat16 result against a datasheet peak (none ran, or no peak known)")
        return
    mfu = max(r.mfu_nominal for r in bf16)
    verdict = "met" if mfu >= TARGET_MFU else "NOT met"
    emit(f"target: MFU >= {TARGET_MFU:.0%} of the bfloat16 datasheet peak: {verdict} ({mfu:.1%})")


def write(lines: list[str], path: str, device: jax.Device, argv: list[str]) -> None:
    """The output with a first line saying when, where and how it was made."""
    when = datetime.datetime.now(datetime.UTC).strftime("%a %b %d %H:%M:%S UTC %Y")
    command = " ".join(["python benchmarks/mfu.py", *argv])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    host = f"{os.cpu_count()} cores | {_cpu_name()} | load avg {load} | {device.device_kind}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {when} | {host} | {command}\n" + "\n".join(lines) + "\n")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
    except OSError:
        names = []
    return names[0].strip() if names else "CPU"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    xla_flags.apply()  # as every jtrain command does first: XLA reads them when it starts
    # A GPU benchmark may use most of the memory (JAX's default pool is 75%); read when the
    # backend starts, so it has no effect once jax has started it (a test, a notebook).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    start = time.perf_counter()
    device = jax.devices()[0]
    shape_name = args.shape or ("cpu" if device.platform == "cpu" else "llama3_1b")
    shape = SHAPES[shape_name]
    combos = plan(args.only, args.loss_chunk or shape.loss_chunk, device.platform)
    accel, head_dim = attention_impl.this_device(), shape.overrides["model.head_dim"]

    def skip(combo: Combination) -> str | None:
        return skip_reason(combo, accel, head_dim)

    runnable = [c for c in combos if skip(c) is None]
    cap = args.max_batch or shape.max_batch
    bench = Bench(shape, device, steps=args.steps, warmup=args.warmup, cap=cap)
    bench.measure_peaks([d for d in AXES["dtype"] if d in {c.dtype for c in runnable}])
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    header(bench, shape_name, combos, len(runnable), args, emit)
    results, failures = sweep(bench, combos, skip, args.budget_s, start, emit)
    report_best(results, emit)
    emit(f"wall time      : {time.perf_counter() - start:.0f} s")
    if args.write is not None:
        slug = re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_")
        default = os.path.join(REPO_ROOT, "benchmarks", "results", f"mfu_{slug}.txt")
        write(lines, args.write or default, device, argv)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
