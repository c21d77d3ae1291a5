"""jtrain's supervised recipes against scikit-learn baselines on the same rows.

For each of scikit-learn's bundled digits, breast_cancer and diabetes sets, jtrain's recipe
(configs/digits_cnn.py, tabular_classify.py, tabular_regress.py) is trained for --seeds seeds
in a fresh temporary workdir each, and its test metrics are read from `train_and_evaluate`.
The scikit-learn models are fitted on the train split's arrays exactly as jtrain's
`Preprocessor` makes them (numeric columns standardised on train, images in [0, 1] flattened)
and scored with sklearn.metrics on the same test rows. They see the train split only: the
val split, which jtrain uses for early stopping, is not used by them.

    python benchmarks/supervised_vs_sklearn.py
    python benchmarks/supervised_vs_sklearn.py --sets=breast_cancer,diabetes --seeds=1
    python benchmarks/supervised_vs_sklearn.py --sets=digits --set train.epochs=2

It always exits 0; a requirement that is not met is marked FAIL in the output.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` and `configs` without installing

from sklearn import linear_model, metrics, neural_network, svm  # noqa: E402

from benchmarks import overrides as overrides_lib  # noqa: E402
from jtrain import config as config_lib  # noqa: E402
from jtrain import run  # noqa: E402
from jtrain.data import supervised  # noqa: E402
from jtrain.data.features import Preprocessor  # noqa: E402
from jtrain.tasks.supervised import data_keys  # noqa: E402

SETS = {  # name -> (recipe, jtrain's model name)
    "digits": ("digits_cnn.py", "jtrain CNN"),
    "breast_cancer": ("tabular_classify.py", "jtrain MLP"),
    "diabetes": ("tabular_regress.py", "jtrain MLP"),
}
COLUMNS = ("accuracy", "roc_auc", "r2")
# sklearn 1.9 deprecates SVC(probability=True); it is still the baseline the issue names.
warnings.filterwarnings("ignore", message="The `probability` parameter", category=FutureWarning)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated subset of the sets")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for the random models")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a jtrain config override, e.g. train.epochs=2 (repeatable)")  # fmt: skip
    args = p.parse_args(argv)
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in args.sets if s not in SETS]
    if unknown or not args.sets:
        p.error(f"--sets: unknown {unknown}; choose from {', '.join(SETS)}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


def load_config(name: str, overrides: list[str], seed: int):
    """The set's recipe with --set overrides and `seed` (train_and_evaluate validates it)."""
    config = config_lib.load(os.path.join(REPO_ROOT, "configs", SETS[name][0]))
    config = overrides_lib.apply(config, overrides)
    config.seed = seed
    return config


def split_arrays(config) -> dict:
    """Train and test (x, y) as jtrain's Preprocessor makes them, and the preprocessor."""
    keys = data_keys(config)
    raw = {s: supervised.load_split(config.data.source, s, **keys) for s in ("train", "test")}
    prep = Preprocessor.fit(raw["train"], objective=config.task)
    out = {"prep": prep}
    for split, rows in raw.items():
        arrays, _ = prep.transform(rows)
        if "categorical" in arrays:
            raise ValueError("categorical columns are not handled by this benchmark")
        y = arrays.pop("label" if config.task == "classify" else "target")
        x = [arrays[k].reshape(len(y), -1) for k in ("numeric", "image") if k in arrays]
        out[split] = (np.concatenate(x, axis=1), y)
    return out


def run_jtrain(config, tmp: str, tag: str) -> tuple[dict, float]:
    """jtrain's test metrics and wall seconds; its stdout goes to a log file in `tmp`."""
    workdir = os.path.join(tmp, tag)
    start = time.perf_counter()
    with open(workdir + ".log", "w") as log, contextlib.redirect_stdout(log):
        results = run.train_and_evaluate(config, workdir)
    return results["test"], time.perf_counter() - start


def sklearn_models(task: str, seed: int) -> dict:
    """name -> (a fresh estimator, whether it has randomness) for `task`."""
    mlp = {"max_iter": 2000, "random_state": seed}
    if task == "classify":
        return {
            "LogisticRegression": (linear_model.LogisticRegression(max_iter=5000), False),
            "SVC": (svm.SVC(probability=True, random_state=seed), True),
            "MLPClassifier": (neural_network.MLPClassifier(**mlp), True),
        }
    return {
        "Ridge": (linear_model.Ridge(), False),
        "MLPRegressor": (neural_network.MLPRegressor(**mlp), True),
    }


def fit_sklearn(model, data: dict) -> tuple[dict, float]:
    """Fits on train, scores on test: (metrics, wall seconds of fit and predict)."""
    (x, y), (xt, yt) = data["train"], data["test"]
    start = time.perf_counter()
    model.fit(x, y)
    if data["prep"].objective == "regress":
        to_units = data["prep"].target_to_original
        r2 = metrics.r2_score(to_units(yt), to_units(model.predict(xt)))
        return {"r2": r2}, time.perf_counter() - start
    proba = model.predict_proba(xt)
    scores = proba[:, 1] if proba.shape[1] == 2 else proba  # binary: the positive class
    out = {
        "accuracy": metrics.accuracy_score(yt, model.classes_[proba.argmax(1)]),
        "roc_auc": metrics.roc_auc_score(yt, scores, multi_class="ovr", average="macro"),
    }
    return out, time.perf_counter() - start


def summary(runs: list[tuple[dict, float]]) -> dict:
    """{metric: (mean, population std)} over seeds, with "n" and "wall" (mean seconds)."""
    out = {"n": len(runs), "wall": float(np.mean([w for _, w in runs]))}
    for key in COLUMNS:
        if key in runs[0][0]:
            values = [float(m[key]) for m, _ in runs]
            out[key] = (float(np.mean(values)), float(np.std(values, ddof=0)))
    return out


def bench_set(name: str, args, tmp: str) -> dict:
    """{model: summary} for one set: jtrain's recipe and the scikit-learn models."""
    config = load_config(name, args.set, 0)
    data = split_arrays(config)
    seeds = range(args.seeds)
    runs = {SETS[name][1]: []}
    for s in seeds:
        metrics_s, wall = run_jtrain(load_config(name, args.set, s), tmp, f"{name}_{s}")
        rows = int(metrics_s.get("loss_weight", len(data["test"][1])))
        shown = {k: round(float(metrics_s[k]), 4) for k in COLUMNS if k in metrics_s}
        print(f"  {name} jtrain seed {s}: {shown} ({wall:.1f} s, {rows} test rows)", flush=True)
        if rows != len(data["test"][1]):
            print(f"  WARNING: jtrain's test has {rows} rows, sklearn's {len(data['test'][1])}")
        runs[SETS[name][1]].append((metrics_s, wall))
    for model_name in sklearn_models(config.task, 0):
        for s in seeds:
            model, random = sklearn_models(config.task, s)[model_name]
            runs.setdefault(model_name, []).append(fit_sklearn(model, data))
            if not random:
                break  # deterministic: one fit
        print(f"  {name} {model_name}: {len(runs[model_name])} fit(s) done", flush=True)
    return {model: summary(r) for model, r in runs.items()}


def print_table(results: dict) -> None:
    """One row per (set, model): each metric's mean ± population std, and wall seconds."""
    print(f"\n{'set':<14}{'model':<20}{'n':>3}" + "".join(f"{c:>18}" for c in COLUMNS)
          + f"{'wall s/fit':>12}")  # fmt: skip
    for name, models in results.items():
        for model, s in models.items():
            cells = [f"{s[c][0]:.4f} ± {s[c][1]:.4f}" if c in s else "-" for c in COLUMNS]
            print(f"{name:<14}{model:<20}{s['n']:>3}" + "".join(f"{c:>18}" for c in cells)
                  + f"{s['wall']:>12.2f}")  # fmt: skip
    print("mean ± std over seeds (population std, ddof=0); n = fits (1 where deterministic).")
    print("scikit-learn models are fitted on the train split only (val unused); jtrain uses")
    print("val for early stopping. Wall time: jtrain includes data loading and compilation.")


def best(models: dict, metric: str) -> tuple[str, float]:
    """The scikit-learn model with the highest mean `metric`, and that mean."""
    sk = {m: s[metric][0] for m, s in models.items() if not m.startswith("jtrain")}
    name = max(sk, key=sk.get)
    return name, sk[name]


def check(ok: bool, text: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}: {text}")


def print_requirements(results: dict) -> None:
    """The targets as PASS/FAIL lines, and jtrain mean / best scikit-learn mean ratios."""
    print()
    for name, models in results.items():
        jt = models[SETS[name][1]]
        for metric in [c for c in COLUMNS if c in jt]:
            sk_name, sk_mean = best(models, metric)
            print(f"RATIO {name} {metric} jtrain/best sklearn ({sk_name}) = "
                  f"{jt[metric][0] / sk_mean:.4f}")  # fmt: skip
        if name == "digits":
            acc, (sk_name, sk_acc) = jt["accuracy"][0], best(models, "accuracy")
            check(acc >= 0.985, f"digits CNN mean test accuracy {acc:.4f} >= 0.985")
            check(acc > sk_acc, f"digits CNN {acc:.4f} > best sklearn {sk_name} {sk_acc:.4f}")
        elif name == "breast_cancer":
            auc, acc = jt["roc_auc"][0], jt["accuracy"][0]
            sk_name, sk_acc = best(models, "accuracy")
            check(auc >= 0.99, f"breast_cancer mean test ROC-AUC {auc:.4f} >= 0.99")
            check(acc >= sk_acc - 0.01, f"breast_cancer accuracy {acc:.4f} >= best sklearn "
                  f"{sk_name} {sk_acc:.4f} - 0.01")  # fmt: skip
        elif name == "diabetes":
            r2, ridge = jt["r2"][0], models["Ridge"]["r2"][0]
            check(r2 >= ridge, f"diabetes mean test R² {r2:.4f} >= Ridge's {ridge:.4f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"supervised_vs_sklearn: sets {args.sets}, seeds 0..{args.seeds - 1}, "
          f"overrides {args.set or 'none'}", flush=True)  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sup_bench_") as tmp:
        results = {name: bench_set(name, args, tmp) for name in args.sets}
    print_table(results)
    print_requirements(results)
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
