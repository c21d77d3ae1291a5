"""Distilled students against the same students trained from scratch.

Two comparisons, each of a student recipe run twice from the same seed on the same steps and
data: once as configured (task=distill, learning from its teacher) and once with the teacher
taken away (`task` set to the student's own task, `distill.task`):

- lm: configs/distill_lm.py, a half-width student of the default language model (runs/default);
  compared on the validation split's next-byte loss (`ce` of the distilled run, `loss` of
  the other: the same cross-entropy over the same bytes), lower is better.
- digits: configs/distill_digits.py, a CNN a ninth the size of the digits CNN
  (runs/digits_cnn); compared on test accuracy (at the best validation epoch: both runs use
  the recipe's early stopping), higher is better, over --seeds seeds.

A teacher missing from its workdir is trained first with its own recipe. Students train in
fresh workdirs under --root. The table goes to stdout and to --output.

    python benchmarks/distill_demo.py
    python benchmarks/distill_demo.py --parts=digits --seeds=3 --set distill.temperature=2.0
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` without installing

from benchmarks import overrides as overrides_lib  # noqa: E402
from jtrain import config as config_lib  # noqa: E402
from jtrain import run  # noqa: E402

# part: (student recipe, teacher recipe, split, what is compared, higher is better)
PARTS = {
    "lm": ("distill_lm.py", "default.py", "val", "loss", False),
    "digits": ("distill_digits.py", "digits_cnn.py", "test", "accuracy", True),
}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="lm,digits", help="comma-separated: lm, digits")
    parser.add_argument("--seeds", type=int, default=1, help="student seeds per part")
    parser.add_argument("--first_seed", type=int, default=0, help="seeds from this one on")
    parser.add_argument("--root", default=os.path.join(REPO_ROOT, "runs", "distill_demo"))
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE on the students")
    parser.add_argument(
        "--output",
        default=os.path.join(REPO_ROOT, "benchmarks", "results", "distill_demo_cpu.txt"),
    )
    args = parser.parse_args()
    lines = []
    for part in args.parts.split(","):
        teacher = _teacher(part, args.root)
        _, _, split, metric, higher = PARTS[part]
        distilled, scratch = [], []
        # In pairs, so that a run stopped part way still compares like seeds.
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            distilled.append(_student(part, args.root, seed, args.set, distilled=True))
            scratch.append(_student(part, args.root, seed, args.set, distilled=False))
        d, s = sum(distilled) / len(distilled), sum(scratch) / len(scratch)
        gain = round(d - s if higher else s - d, 9)  # equal means may differ in the last bit
        better = gain > 0
        lines.append(
            f"{part}: teacher {os.path.relpath(teacher, REPO_ROOT)}, {split} {metric} over "
            f"{len(distilled)} seed(s): distilled {d:.4f} vs scratch {s:.4f}, ratio "
            f"{d / s:.4f} ({'better' if better else 'NOT better'}); per seed: distilled "
            f"{', '.join(f'{v:.4f}' for v in distilled)}; scratch "
            f"{', '.join(f'{v:.4f}' for v in scratch)}"
        )
    settings = f"student overrides: {' '.join(args.set) or 'none'}"
    report = "\n".join([settings, *lines]) + "\n"
    print(report, end="")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "a" if os.path.exists(args.output) else "w") as f:
        f.write(report)


if __name__ == "__main__":
    main()
