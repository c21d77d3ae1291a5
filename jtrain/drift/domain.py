"""The whole-dataset test of a drift report: can a classifier tell the new rows from the
reference's?

A linear classifier (ridge: one least-squares solve per fit) on the rows' encoding (tables:
each numeric column and its square, standardised, a missing indicator, one-hot categories;
images: the model's penultimate features; text: each document's token frequencies) is scored by
cross-validated ROC-AUC, 0.5 when the two are alike. Its null comes from the same fit on the
same rows with the reference/new labels shuffled (`permutations` times): a p-value from the t
distribution of the observed AUC against those (a prediction interval, so a few permutations
suffice) and a 95% null interval. Linear, so it is fast enough to run every time; the squares
let it see a change of spread as well as of location.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import stats

SAMPLE_CAP = 2000  # rows per side the classifier sees (subsampled beyond): seconds, not minutes
FOLDS = 3
PERMUTATIONS = 20


@dataclasses.dataclass(frozen=True)
class DomainResult:
    """The classifier's cross-validated AUC, its permutation null and p-value."""

    auc: float
    null_mean: float
    null_low: float
    null_high: float
    p_value: float
    n_reference: int
    n_current: int
    permutations: int


def _cv_auc(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import RidgeClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a fold that does not converge still scores
        warnings.simplefilter("ignore")
        scores = cross_val_predict(model, x, y, cv=folds, method="decision_function")
    return float(roc_auc_score(y, scores))


def domain_test(
    reference: np.ndarray, current: np.ndarray, *, permutations: int = PERMUTATIONS, seed: int = 0
) -> DomainResult | None:
    """The domain classifier on two encoded samples [n, d]; None when either side has fewer
    rows than folds (nothing to cross-validate)."""
    rng = np.random.default_rng(seed)
    ref, cur = (_capped(np.asarray(a, np.float64), rng) for a in (reference, current))
    if min(len(ref), len(cur)) < 2 * FOLDS or ref.shape[1] == 0:
        return None
    x = np.concatenate([ref, cur])
    y = np.concatenate([np.zeros(len(ref)), np.ones(len(cur))])
    auc = _cv_auc(x, y, seed)
    null = np.array([_cv_auc(x, rng.permutation(y), seed) for _ in range(permutations)])
    mean, sd = float(null.mean()), max(float(null.std(ddof=1)), 1e-6)
    spread = sd * np.sqrt(1 + 1 / permutations)  # a new draw's spread about the null's mean
    half = float(stats.t.ppf(0.975, permutations - 1)) * spread
    p_value = float(stats.t.sf((auc - mean) / spread, permutations - 1))
    return DomainResult(
        auc, mean, mean - half, mean + half, p_value, len(ref), len(cur), permutations
    )


def _capped(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (
        rows if len(rows) <= SAMPLE_CAP else rows[rng.choice(len(rows), SAMPLE_CAP, replace=False)]
    )


def encode_table(reference: dict, current: dict) -> tuple[np.ndarray, np.ndarray]:
    """Both samples' table columns ({name: (kind, values)}) encoded with the reference's
    statistics: numeric as value and square (missing: the reference median, plus an
    indicator), categorical one-hot over the reference's categories."""
    ref_parts, cur_parts = [], []
    for name, (kind, ref_values) in reference.items():
        cur_values = current[name][1]
        if kind == "numeric":
            r, c = np.asarray(ref_values, np.float64), np.asarray(cur_values, np.float64)
            finite = r[np.isfinite(r)]
            fill = float(np.median(finite)) if len(finite) else 0.0
            sd = float(np.std(finite)) if len(finite) else 1.0
            for values, parts in ((r, ref_parts), (c, cur_parts)):
                gone = ~np.isfinite(values)
                z = (np.where(gone, fill, values) - fill) / (sd or 1.0)
                parts.extend([z, z**2, gone.astype(np.float64)])
        else:
            categories = sorted({str(v) for v in ref_values if v is not None})[:50]
            for values, parts in ((ref_values, ref_parts), (cur_values, cur_parts)):
                text = np.array(["" if v is None else str(v) for v in values], dtype=object)
                parts.extend([(text == cat).astype(np.float64) for cat in categories])
    return _stacked(ref_parts, reference), _stacked(cur_parts, current)


def _stacked(parts: list, columns: dict) -> np.ndarray:
    rows = len(next(iter(columns.values()))[1]) if columns else 0
    return np.stack(parts, axis=1) if parts else np.zeros((rows, 0))
