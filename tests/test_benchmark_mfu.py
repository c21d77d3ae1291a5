"""benchmarks/mfu.py: one run of its main on the CPU shape, checked field by field, and its
batch search, peak table and sweep order checked without compiling anything."""

import contextlib
import io
import math
import re
import time
import types

import jax
import pytest

from benchmarks import mfu, mfu_batch, mfu_flops, mfu_step
from jtrain.models import attention_impl

# A result line: label | batch | step | tokens/s | FLOP/s | MFU | XLA/ours | memory | loss | ...
RESULT = re.compile(
    r"^(?P<label>\S+ \S+ chunk=\d+ remat=\S+)\s+\| batch\s+(?P<batch>\d+) \| step (?P<ms>[\d,.]+)"
    r" ms \| (?P<tokens>[\d,]+) tokens/s \| \S+ TFLOP/s \| MFU (?P<nominal>n/a|[\d.]+%) nominal, "
    r"(?P<measured>[\d.]+)% measured \| XLA/ours (?P<raw>[\d.]+), (?P<counted>[\d.]+) as counted"
    r" \| memory [\d.]+ GiB \| loss (?P<loss>[\d.]+) \| compile (?P<compile>[\d.]+) s \(\d+\)$"
)
ONE_COMBINATION = ["--only", "dtype=float32", "loss_chunk=0", "remat=none"]


def run_main(*flags: str) -> tuple[int, str, float]:
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = mfu.main(["--shape=cpu", "--steps=2", "--warmup=1", "--max_batch=1", *flags])
    return code, out.getvalue(), time.perf_counter() - start


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("mfu") / "mfu_cpu.txt"
    code, text, seconds = run_main(*ONE_COMBINATION, "attention=xla,cudnn", f"--write={path}")
    return code, text, seconds, path


def test_result_line_has_sane_figures(run):
    code, text, _, _ = run
    assert code == 0, text
    [line] = [line for line in text.splitlines() if RESULT.match(line)]
    r = RESULT.match(line)
    assert r["label"] == "float32 xla chunk=0 remat=none"
    assert int(r["batch"]) == 1  # no memory limit on a CPU: the cap, --max_batch
    step_s, tokens = float(r["ms"].replace(",", "")) / 1e3, int(r["tokens"].replace(",", ""))
    assert tokens == pytest.approx(256 / step_s, rel=0.01)
    assert r["nominal"] == "n/a"  # no datasheet peak for a CPU
    assert 0 < float(r["measured"]) <= 150  # against the same run's float32 matmul
    # XLA counts a loop's body once, so of the 2 scanned blocks it sees one: its raw count is
    # well under ours. Ours counted the same way must match it to within what the model FLOPs
    # leave out on purpose (AdamW, norms, RoPE, the softmax: a few per cent at this width).
    assert 0.3 < float(r["raw"]) < 1.0
    assert 0.95 < float(r["counted"]) < 1.25
    # A random-token LM at initialisation: a loss near log(vocabulary).
    assert abs(float(r["loss"]) - math.log(2048)) < 1.0


def test_cudnn_skipped_off_gpu_and_best_printed(run):
    _, text, _, _ = run
    assert "float32 cudnn chunk=0 remat=none" in text
    assert "skipped: cuDNN attention cannot run: it runs on NVIDIA GPUs only" in text
    assert "BEST  float32 xla chunk=0 remat=none" in text
    assert re.search(r"^RATIO best step FLOP/s / same-run float32 matmul = 0\.\d+$", text, re.M)


def test_written_file_is_the_output_after_a_header(run):
    _, text, _, path = run
    first, *rest = path.read_text().splitlines()
    assert first.startswith("# ") and "python benchmarks/mfu.py --shape=cpu" in first
    assert rest == text.splitlines()


def test_budget_spent_skips_the_rest():
    # The first combination is the module run's (a compile-cache hit); then the budget is spent.
    flags = ["--only", "dtype=float32", "attention=xla", "loss_chunk=0", "remat=none,full"]
    code, text, _ = run_main(*flags, "--budget_s=0")
    assert code == 0, text
    ran = [m["label"] for m in map(RESULT.match, text.splitlines()) if m]
    assert ran == ["float32 xla chunk=0 remat=none"]
    assert re.search(r"^float32 xla chunk=0 remat=full +\| skipped: --budget_s=0 spent", text, re.M)


def test_out_of_memory_running_frees_nothing_it_needs_and_is_reported(monkeypatch):
    """A run that runs out of memory may have freed its donated state: the next is made anew."""
    made = []
    ensure_state = mfu_step.Bench.ensure_state

    def counting_ensure_state(self, exp):
        made.append(self.state is None or any(x.is_deleted() for x in jax.tree.leaves(self.state)))
        ensure_state(self, exp)

    def out_of_memory(self, exp, fit):
        for x in jax.tree.leaves(self.state):
            x.delete()  # what a failed run of a step that donates its state can leave
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while running")

    monkeypatch.setattr(mfu_step.Bench, "ensure_state", counting_ensure_state)
    monkeypatch.setattr(mfu_step.Bench, "time_steps", out_of_memory)
    code, text, _ = run_main(*ONE_COMBINATION, "attention=xla")
    assert code == 0, text
    assert "remat=none          | does not fit: batch 1: out of memory running" in text
    assert made == [True, True]  # the first state, then a new one for the freed state
    assert "BEST: no combination ran" in text


class FakeStep:
    """A 'compiled step' whose memory analysis says fixed + per_example * batch bytes."""

    def __init__(self, needed: int):
        self.analysis = types.SimpleNamespace(
            argument_size_in_bytes=needed,
            output_size_in_bytes=0,
            alias_size_in_bytes=0,
            temp_size_in_bytes=0,
        )

    def memory_analysis(self):
        return self.analysis


def fake_compiler(needed, oom_from: int | None = None):
    """compile_at for choose_batch, recording what it compiled; batches >= oom_from raise
    XLA's out-of-memory error while compiling."""
    compiled = []

    def compile_at(batch: int, probe: bool):
        compiled.append((batch, probe))
        if oom_from is not None and batch >= oom_from:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")
        return FakeStep(needed(batch))

    return compile_at, compiled


GIB = 2**30


def test_choose_batch_jumps_to_the_predicted_size_and_never_compiles_hopeless_ones():
    compile_at, compiled = fake_compiler(lambda b: 20 * GIB + b * 10 * GIB)
    fit = mfu_batch.choose_batch(64, 110 * GIB, compile_at, notes := [])
    assert fit.batch == 8 and fit.needed == 100 * GIB
    assert compiled == [(1, True), (2, True), (8, False)]  # 4 is smaller, 16 cannot fit
    assert notes == []


def test_choose_batch_halves_when_the_prediction_was_too_hopeful():
    # Linear up to 2, then each example costs 4x: batch 8 is predicted to fit and does not.
    compile_at, compiled = fake_compiler(lambda b: 20 * GIB + b * (10 if b <= 2 else 40) * GIB)
    fit = mfu_batch.choose_batch(64, 110 * GIB, compile_at, notes := [])
    assert fit.batch == 2
    assert compiled == [(1, True), (2, True), (8, False), (4, False), (2, False)]
    assert notes[0] == "batch 8 needs 340.0 GiB of 110.0 available"


def test_choose_batch_out_of_memory_while_compiling_is_not_fitting():
    compile_at, _ = fake_compiler(lambda b: GIB * b, oom_from=4)
    fit = mfu_batch.choose_batch(64, 100 * GIB, compile_at, notes := [])
    assert fit.batch == 2
    assert notes == [f"batch {b}: out of memory compiling" for b in (64, 32, 16, 8, 4)]


def test_choose_batch_other_errors_propagate_and_nothing_fits_is_none():
    def broken(batch, probe):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        mfu_batch.choose_batch(8, GIB, broken, [])
    compile_at, _ = fake_compiler(lambda b: 2 * GIB)
    assert mfu_batch.choose_batch(8, GIB, compile_at, notes := []) is None
    assert notes == ["batch 1 needs 2.0 GiB of 1.0 available"]


def test_choose_batch_without_a_memory_limit_takes_the_cap():
    compile_at, compiled = fake_compiler(lambda b: GIB)
    assert mfu_batch.choose_batch(12, None, compile_at, []).batch == 8  # a power of two
    assert compiled == [(8, False)]


def device(platform: str, kind: str):
    return types.SimpleNamespace(platform=platform, device_kind=kind)


def test_nominal_peaks_per_device_and_dtype():
    h200 = device("gpu", "NVIDIA H200")
    assert mfu_flops.nominal_peak(h200, "bfloat16") == 989e12
    assert mfu_flops.nominal_peak(h200, "float32") == 494.7e12  # TF32, dense
    assert mfu_flops.nominal_peak(device("gpu", "NVIDIA H100 PCIe"), "bfloat16") == 756e12
    assert mfu_flops.nominal_peak(device("gpu", "NVIDIA B200"), "bfloat16") == 2.25e15
    v5e = device("tpu", "TPU v5 lite")
    assert mfu_flops.nominal_peak(v5e, "float32") == mfu_flops.nominal_peak(v5e, "bfloat16")
    assert mfu_flops.nominal_peak(device("cpu", "cpu"), "float32") == 0.0


def test_sweep_order_on_a_gpu_puts_bfloat16_cudnn_first():
    combos = mfu.plan({}, 512, "gpu")
    assert len(combos) == 24
    assert [c.label for c in combos[:4]] == [
        "bfloat16 cudnn chunk=512 remat=none",
        "bfloat16 cudnn chunk=512 remat=dots",
        "bfloat16 cudnn chunk=512 remat=full",
        "bfloat16 cudnn chunk=0 remat=none",
    ]
    h200 = attention_impl.Device("gpu", compute_capability="9.0", cudnn_version=90800)
    skipped = [c.label for c in combos if mfu.skip_reason(c, h200, head_dim=64)]
    assert skipped == [c.label for c in combos if c.dtype == "float32" and c.attention == "cudnn"]
    only = mfu.plan({"remat": ("full", "none"), "loss_chunk": (128,)}, 512, "cpu")
    assert [c.label for c in only[:2]] == [
        "bfloat16 xla chunk=128 remat=none",
        "bfloat16 xla chunk=128 remat=full",
    ]


@pytest.mark.parametrize(
    "item, message",
    [
        ("precision=high", "KEY one of dtype, attention, loss_chunk, remat"),
        ("dtype=float16", "'float16' is not a dtype; allowed: bfloat16, float32"),
        ("loss_chunk=-1", "loss_chunk values are integers >= 0"),
    ],
)
def test_bad_only_is_one_clear_line(item, message, capsys):
    with pytest.raises(SystemExit):
        mfu.parse_args(["--only", item])
    assert message in capsys.readouterr().err


def fake_result(dtype: str, tokens_per_s: float, mfu_nominal: float) -> mfu_step.Result:
    combo = mfu_step.Combination(dtype, "xla", 0, "none")
    return mfu_step.Result(
        combo, 1, 1.0, tokens_per_s, 1.0, mfu_nominal, 0.9, 1.0, 1.0, 0, 1.0, 1, 1.0
    )


def test_best_is_the_fastest_and_the_target_is_judged_on_bfloat16():
    lines = []
    results = [fake_result("float32", 10, 0.60), fake_result("bfloat16", 20, 0.55)]
    mfu.report_best(results, lines.append)
    assert lines[0].startswith("BEST  bfloat16 xla chunk=0 remat=none")
    assert lines[-1] == "target: MFU >= 50% of the bfloat16 datasheet peak: met (55.0%)"
    lines.clear()
    mfu.report_best(
        [fake_result("float32", 30, 0.6), fake_result("bfloat16", 20, 0.41)], lines.append
    )
    assert lines[0].startswith("BEST  float32")
    assert lines[-1] == "target: MFU >= 50% of the bfloat16 datasheet peak: NOT met (41.0%)"


def test_only_items_add_up():
    args = mfu.parse_args(["--only=dtype=float32", "--only", "remat=none,full", "loss_chunk=0,32"])
    assert args.only == {"dtype": ("float32",), "remat": ("none", "full"), "loss_chunk": (0, 32)}
