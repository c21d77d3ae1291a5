"""False-alarm and detection rates of `jtrain.drift`'s statistics, over many trials.

Each trial compares a reference sample with a new one through `jtrain.drift.report.compare`
(the code the report runs, Holm's correction over every test) and counts a false alarm when
the report says "drift" on same-distribution data, a detection when it does on shifted data,
and an exact naming when it names the shifted columns and nothing else.

- synthetic table: 6 numeric columns (normal, lognormal, Poisson counts, 10% missing,
  uniform, bimodal) and 2 categorical ones, independent; reference 2000 rows (the train
  split's sample, drawn anew each trial), new rows 100 / 300 / 1000; shifts of a column's
  location by a fraction of its sd, or of a category's share;
- breast cancer (scikit-learn's 569 rows, 30 strongly correlated columns): each trial splits
  the rows at random into 450 reference and 119 new (same distribution by construction), and
  for detection shifts two columns by half a sd;
- text: pydoc's 79 help topics split at random into 60 reference and 19 new documents (the
  default language model's data), against 19 random standard-library modules (byte tokens;
  the per-document loss needs a model and is left out here).

    python benchmarks/drift_calibration.py [--trials=200] [--domain_trials=40]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jtrain.drift import report  # noqa: E402
from jtrain.drift.profile import Column, Sample  # noqa: E402
from tests import drift_synthetic as synthetic  # noqa: E402


def _rates(trials, make, expected: set | None) -> tuple[float, float]:
    """(share of trials that said drift, share naming exactly `expected`)."""
    drift = exact = 0
    for seed in range(trials):
        result = make(seed)
        drift += result["drift"]
        exact += expected is not None and set(result["drifting_features"]) == expected
    return drift / trials, exact / trials


def _line(name: str, rate: float, trials: int, exact: float | None = None) -> None:
    half = 1.96 * np.sqrt(max(rate * (1 - rate), 1 / trials) / trials)
    named = f"  named exactly {exact:6.1%}" if exact is not None else ""
    print(f"  {name:<52} {rate:6.1%} (+-{half:.1%}, {trials} trials){named}", flush=True)


def synthetic_table(trials: int, domain_trials: int) -> None:
    print("synthetic table, reference 2000 rows (drawn anew each trial, as a new run's would be)")

    def new(rows, shift=None, permutations=0):
        def make(s):
            rng = np.random.default_rng(s)
            reference = synthetic.sample(synthetic.table(2000, rng))
            current = synthetic.sample(synthetic.table(rows, rng, shift))
            return report.compare(reference, current, permutations=permutations, seed=s)

        return make

    for rows in (100, 300, 1000):
        _line(
            f"false alarms, {rows} new rows, column tests",
            _rates(trials, new(rows), None)[0],
            trials,
        )
    rate = _rates(domain_trials, new(300, permutations=20), None)[0]
    _line("false alarms, 300 new rows, with the domain classifier", rate, domain_trials)
    for shift in (
        {"normal": 0.25},
        {"normal": 0.5},
        {"counts": 0.5, "colour": 0.25},
        {"counts": 0.75, "colour": 0.35},
        {"with_missing": 0.5, "size": 0.3},
    ):
        for rows in (100, 300):
            rate, exact = _rates(trials, new(rows, shift), set(shift))
            _line(f"detects {shift}, {rows} rows", rate, trials, exact)


def breast_cancer(trials: int, domain_trials: int) -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, names = data.data, [str(name) for name in data.feature_names]
    print(f"breast cancer: {len(x)} rows, {len(names)} correlated columns, 450 vs 119")

    def sample(rows):
        return Sample(
            {n: Column(n, "numeric", "feature", rows[:, i]) for i, n in enumerate(names)},
            rows=len(rows),
        )

    def trial(shift: float, permutations: int):
        def make(seed):
            order = np.random.default_rng(seed).permutation(len(x))
            ref, cur = x[order[:450]], x[order[450:]].copy()
            cur[:, :2] += shift * x[:, :2].std(axis=0)
            return report.compare(sample(ref), sample(cur), permutations=permutations, seed=seed)

        return make

    _line("false alarms, column tests", _rates(trials, trial(0.0, 0), None)[0], trials)
    _line(
        "false alarms, with the domain classifier",
        _rates(domain_trials, trial(0.0, 20), None)[0],
        domain_trials,
    )
    rate, exact = _rates(trials, trial(0.5, 0), set(names[:2]))
    _line(f"detects +0.5 sd in {names[0]!r}, {names[1]!r}", rate, trials, exact)


def text(trials: int) -> None:
    from jtrain.data import embedded
    from jtrain.drift import text_profiler

    docs = lambda texts: [np.frombuffer(t.encode(), np.uint8).astype(np.int64) for t in texts]  # noqa: E731
    pydoc = docs([t for split in embedded.pydoc_topics().values() for t in split])
    stdlib = docs([t for split in embedded.python_stdlib().values() for t in split])
    print(
        f"text: pydoc {len(pydoc)} documents (60 reference, 19 new), stdlib {len(stdlib)} modules"
    )

    def sample(chosen, vocabulary):
        counts = text_profiler._counts(chosen, vocabulary)
        lengths = np.array([len(d) for d in chosen], np.float64)
        frequencies = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        columns = {
            "document_length": Column("document_length", "numeric", "feature", lengths),
            "tokens": Column("tokens", "tokens", "feature", counts),
        }
        embedding = np.concatenate([frequencies, np.log1p(lengths)[:, None]], axis=1)
        return Sample(columns, embedding, len(chosen))

    def trial(other: bool):
        def make(seed):
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(pydoc))
            ref = [pydoc[i] for i in order[:60]]
            new = (
                [stdlib[i] for i in rng.choice(len(stdlib), 19, replace=False)]
                if other
                else [pydoc[i] for i in order[60:]]
            )
            totals = np.bincount(np.concatenate(ref), minlength=256)
            vocabulary = np.sort(np.argsort(-totals, kind="stable")[:255])
            return report.compare(
                sample(ref, vocabulary), sample(new, vocabulary), permutations=20, seed=seed
            )

        return make

    _line("false alarms, held-back documentation", _rates(trials, trial(False), None)[0], trials)
    _line("detects standard-library code", _rates(trials, trial(True), None)[0], trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--domain_trials", type=int, default=40)
    parser.add_argument("--text_trials", type=int, default=40)
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"jtrain.drift calibration: alpha {report.ALPHA}, Holm over every test; "
        "rate (+- a 95% binomial half-width)"
    )
    synthetic_table(args.trials, args.domain_trials)
    breast_cancer(args.trials, args.domain_trials)
    text(args.text_trials)
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
