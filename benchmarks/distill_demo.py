"""Distilled students against the same students trained from scratch.

Two comparisons, each of a student recipe run twice from the same seed on the same steps and
data: once as configured (task=distill, learning from its teacher) and once with the teacher
taken away (`task` set to the student's own task, `distill.task`):

- lm: configs/distill_lm.py, a half-width student of the default language model (runs/default);
  compared on the validation split's next-byte loss (`ce` of the distilled run, `loss` of
  the other: the same cross-entropy over the same bytes), lower is better.
- digits: configs/distill_digits.py, a small CNN student of the digits CNN (runs/digits_cnn);
  compared on test accuracy (at the best validation epoch: both runs use the recipe's early
  stopping), higher is better.

The comparison is paired: each seed gives one difference, distilled minus scratch. The report
gives them, their mean, its standard error (the differences' sample standard deviation over
sqrt(seeds)) and how many seeds the distilled student won, tied and lost. The verdict says
"better" only when the mean difference is in distillation's favour by more than two standard
errors (a paired t-like test at roughly 95% for many seeds; with few seeds t's own threshold
is higher, so 2 is a lenient bar there), and it needs two seeds or more: one seed has no
standard error.

A teacher missing from its workdir is trained first with its own recipe. Students train in
fresh workdirs under --root. The table goes to stdout and, after a `#` line with the date, the
machine and the command, to --output.

    python benchmarks/distill_demo.py                     # lm: 1 seed, digits: 8 seeds
    python benchmarks/distill_demo.py --parts=digits --seeds=5 --set distill.temperature=2.0
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import shutil
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` without installing

import jax  # noqa: E402

from benchmarks import overrides as overrides_lib  # noqa: E402
from jtrain import config as config_lib  # noqa: E402
from jtrain import run  # noqa: E402

# part: (student recipe, teacher recipe, split, what is compared, higher is better)
PARTS = {
    "lm": ("distill_lm.py", "default.py", "val", "loss", False),
    "digits": ("distill_digits.py", "digits_cnn.py", "test", "accuracy", True),
}
# Seeds per part when --seeds is not given: the lm runs are slow; the digits verdict needs
# several seeds (eight gave the figures in the README).
DEFAULT_SEEDS = {"lm": 1, "digits": 8}


@dataclasses.dataclass(frozen=True)
class Paired:
    """One part's per-seed differences, distilled minus scratch, and what they show."""

    differences: list[float]
    higher: bool  # whether a higher figure is better (accuracy) or a lower one (loss)

    @property
    def mean(self) -> float:
        """The mean difference."""
        return sum(self.differences) / len(self.differences)

    @property
    def stderr(self) -> float:
        """The mean's standard error; nan with one seed."""
        n = len(self.differences)
        if n < 2:
            return math.nan
        variance = sum((d - self.mean) ** 2 for d in self.differences) / (n - 1)
        return math.sqrt(variance / n)

    def counts(self) -> tuple[int, int, int]:
        """Seeds where the distilled student was better, equal, worse."""
        # Rounded: two accuracies of the same number of images may differ in the last bit.
        gains = [round(d if self.higher else -d, 9) for d in self.differences]
        return sum(g > 0 for g in gains), sum(g == 0 for g in gains), sum(g < 0 for g in gains)

    def better(self) -> bool:
        """Whether the mean difference favours distillation by more than 2 standard errors."""
        if len(self.differences) < 2:
            return False
        gain = round(self.mean if self.higher else -self.mean, 9)
        return gain > 2 * self.stderr

    def verdict(self) -> str:
        """One line: better or not, and why."""
        n, mean, se = len(self.differences), self.mean, self.stderr
        if n < 2:
            return f"NOT shown better: one seed has no standard error (difference {mean:+.4f})"
        gain = round(mean if self.higher else -mean, 9)
        # Identical differences have no spread: t is infinite, or undefined when they are 0.
        t = gain / se if se > 0 else math.copysign(math.inf, gain) if gain else math.nan
        within = "exceeds" if self.better() else "does not exceed"
        return (
            f"{'better' if self.better() else 'NOT shown better'}: mean difference {mean:+.4f} "
            f"{within} 2 standard errors (2 x {se:.4f}) in distillation's favour; t = {t:.2f} "
            f"over {n} seeds"
        )


def _recipe(name: str, sets: list[str], seed: int | None = None):
    config = config_lib.load(os.path.join(REPO_ROOT, "configs", name))
    overrides_lib.apply(config, sets)
    if seed is not None:
        config.seed = seed
    return config


def _teacher(part: str, root: str) -> str:
    """The teacher's workdir (the recipe's distill.teacher), trained now when it has no
    checkpoint."""
    student, teacher_recipe = PARTS[part][:2]
    workdir = os.path.join(REPO_ROOT, _recipe(student, []).distill.teacher)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        print(f"training the teacher: configs/{teacher_recipe} -> {workdir}", flush=True)
        run.train_and_evaluate(_recipe(teacher_recipe, []), workdir)
    return workdir


def _student(part: str, root: str, seed: int, sets: list[str], *, distilled: bool) -> float:
    """The compared figure of one student run in a fresh workdir."""
    student, _, split, metric, _ = PARTS[part]
    config = _recipe(student, sets, seed)
    config.distill.teacher = os.path.join(REPO_ROOT, config.distill.teacher)
    if not distilled:
        config.task = config.distill.task  # the same student, steps and data; no teacher
    workdir = os.path.join(root, f"{part}_{'distilled' if distilled else 'scratch'}_{seed}")
    shutil.rmtree(workdir, ignore_errors=True)
    started = time.perf_counter()
    result = run.train_and_evaluate(config, workdir)[split]
    # A distilled run's `loss` is the distillation loss; `ce` is its own loss, the one the
    # run without a teacher reports as `loss`.
    value = result["ce" if distilled and metric == "loss" else metric]
    took = time.perf_counter() - started
    print(
        f"{part} seed {seed} {'distilled' if distilled else 'scratch'}: {split} {metric} "
        f"{value:.4f} ({took:.0f}s)",
        flush=True,
    )
    return value


def _part_report(part: str, teacher: str, distilled: list[float], scratch: list[float]):
    """The report's lines for one part: the figures, the paired differences, the verdict."""
    _, _, split, metric, higher = PARTS[part]
    paired = Paired([a - b for a, b in zip(distilled, scratch, strict=True)], higher)
    d, s = sum(distilled) / len(distilled), sum(scratch) / len(scratch)
    wins, ties, losses = paired.counts()
    return [
        f"{part}: teacher {os.path.relpath(teacher, REPO_ROOT)}, {split} {metric} over "
        f"{len(distilled)} seed(s): distilled {d:.4f} vs scratch {s:.4f}, ratio {d / s:.4f}; "
        f"per seed: distilled {', '.join(f'{v:.4f}' for v in distilled)}; scratch "
        f"{', '.join(f'{v:.4f}' for v in scratch)}",
        f"{part}: distilled - scratch per seed: "
        f"{', '.join(f'{v:+.4f}' for v in paired.differences)}; mean {paired.mean:+.4f}, "
        f"standard error {paired.stderr:.4f}; distilled better on {wins}, equal on {ties}, "
        f"worse on {losses}",
        f"{part}: {paired.verdict()}",
    ]


def _header(argv: list[str]) -> str:
    """The `#` line before a report in --output: when, where and the exact command."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    where = f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.default_backend()}"
    return f"# {when}, {where}: python benchmarks/distill_demo.py {' '.join(argv)}".rstrip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="lm,digits", help="comma-separated: lm, digits")
    parser.add_argument(
        "--seeds", type=int, help="student seeds per part (default: lm 1, digits 8)"
    )
    parser.add_argument("--first_seed", type=int, default=0, help="seeds from this one on")
    parser.add_argument("--root", default=os.path.join(REPO_ROOT, "runs", "distill_demo"))
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE on the students")
    parser.add_argument(
        "--output",
        default=os.path.join(REPO_ROOT, "benchmarks", "results", "distill_demo_cpu.txt"),
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        parser.error(f"--parts names {', '.join(unknown)}; allowed: {', '.join(PARTS)}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds={args.seeds}: give at least 1 (2 or more for a verdict)")
    lines = []
    for part in args.parts.split(","):
        teacher = _teacher(part, args.root)
        distilled, scratch = [], []
        # In pairs, so that a run stopped part way still compares like seeds.
        seeds = DEFAULT_SEEDS[part] if args.seeds is None else args.seeds
        for seed in range(args.first_seed, args.first_seed + seeds):
            distilled.append(_student(part, args.root, seed, args.set, distilled=True))
            scratch.append(_student(part, args.root, seed, args.set, distilled=False))
        lines += _part_report(part, teacher, distilled, scratch)
    settings = f"student overrides: {' '.join(args.set) or 'none'}"
    report = "\n".join([settings, *lines]) + "\n"
    print(report, end="")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "a") as f:
        f.write(_header(argv) + "\n" + report)


if __name__ == "__main__":
    main()
