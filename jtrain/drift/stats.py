"""The per-column two-sample tests of a drift report, and the multiple-testing correction.

Every test compares a reference sample (the train split, capped; see `profile.SAMPLE_CAP`)
with the new data and returns a p-value under "same distribution", so all of a report's tests
can be corrected together:

- numeric columns: Kolmogorov–Smirnov (scipy's `ks_2samp`: exact for small samples,
  asymptotic above); missing values are tested apart, as a share (a 2x2 chi² test), and the
  smaller p-value of the two, Bonferroni-doubled, is the column's;
- categorical columns: chi² on the contingency table of category counts (categories seen in
  neither sample dropped, rare ones pooled so expected counts stay >= 5, as the test needs);
- both report an effect size: the Wasserstein distance in reference standard deviations
  (numeric) or the Jensen–Shannon distance (categorical), and the PSI with its own p-value
  (PSI is asymptotically (1/n + 1/m)·χ²(bins − 1) under the null: Yurdakul 2018).

With large samples every p-value goes to 0 for differences too small to matter, so above
`LARGE_SAMPLE` rows on both sides a column drifts only when its effect size also reaches
`EFFECT_THRESHOLD` (evidently's rule: Wasserstein or Jensen–Shannon above 0.1).

The correction is Holm's: it holds the family-wise error at alpha, so with probability at
least 1 - alpha no column is named that did not drift, whether or not others did, and under any
dependence between the tests (a table's columns are correlated; the model's predictions follow
its features). Benjamini–Hochberg would find a little more, but bounds only the share of wrong
names: with two columns really drifting it named a third in 1 trial in 4 of our calibration,
and a report names columns for someone to act on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats
from scipy.spatial import distance

LARGE_SAMPLE = 1000  # rows on both sides above which the effect-size gate applies
EFFECT_THRESHOLD = 0.1  # Wasserstein (in reference sds) or Jensen–Shannon distance
PSI_BINS = 10  # reference deciles
_MIN_EXPECTED = 5.0  # chi²'s rule of thumb: pool categories expected fewer times than this


@dataclasses.dataclass(frozen=True)
class ColumnTest:
    """One column's comparison; `p_adjusted` and `drift` are set by `correct`."""

    name: str
    kind: str  # "numeric" | "categorical" | "tokens"
    role: str  # "feature" | "prediction" | "loss" | ...
    test: str  # the test the p-value comes from
    statistic: float
    p_value: float
    effect: float  # Wasserstein in reference sds, or Jensen–Shannon distance
    effect_name: str
    psi: float
    psi_p_value: float
    n_reference: int
    n_current: int
    missing_reference: float
    missing_current: float
    p_adjusted: float = 1.0
    drift: bool = False


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _missing_p(ref_missing: int, n_ref: int, cur_missing: int, n_cur: int) -> float:
    """p-value of equal missing shares (chi² on the 2x2 table; 1 when neither has any)."""
    if ref_missing + cur_missing == 0 or ref_missing + cur_missing == n_ref + n_cur:
        return 1.0
    table = [[ref_missing, n_ref - ref_missing], [cur_missing, n_cur - cur_missing]]
    return float(stats.chi2_contingency(table)[1])


def psi(ref_counts: np.ndarray, cur_counts: np.ndarray) -> tuple[float, float]:
    """Population stability index of two count vectors over the same bins, and its p-value."""
    ref, cur = np.asarray(ref_counts, np.float64), np.asarray(cur_counts, np.float64)
    n, m = ref.sum(), cur.sum()
    if n == 0 or m == 0 or len(ref) < 2:
        return 0.0, 1.0
    eps = 0.5  # a half count in empty bins keeps the log finite (the usual correction)
    p, q = (ref + eps) / (n + eps * len(ref)), (cur + eps) / (m + eps * len(cur))
    value = float(np.sum((q - p) * np.log(q / p)))
    p_value = float(stats.chi2.sf(value / (1.0 / n + 1.0 / m), df=len(ref) - 1))
    return value, p_value


def decile_edges(reference: np.ndarray) -> np.ndarray:
    """Inner bin edges at the reference's deciles (duplicates removed: discrete columns)."""
    ref = _finite(reference)
    if not len(ref):
        return np.array([])
    return np.unique(np.quantile(ref, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))


def numeric_test(name: str, role: str, reference, current) -> ColumnTest:
    """KS on the present values, a chi² on the missing shares; Wasserstein and PSI beside."""
    ref_all, cur_all = np.asarray(reference, np.float64), np.asarray(current, np.float64)
    ref, cur = _finite(ref_all), _finite(cur_all)
    p_missing = _missing_p(
        len(ref_all) - len(ref), len(ref_all), len(cur_all) - len(cur), len(cur_all)
    )
    if len(ref) and len(cur):
        ks = stats.ks_2samp(ref, cur)
        statistic, p_ks = float(ks.statistic), float(ks.pvalue)
        sd = float(np.std(ref)) or 1.0
        effect = float(stats.wasserstein_distance(ref, cur)) / sd
        edges = decile_edges(ref)
        counts = [
            np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
            for x in (ref, cur)
        ]
        psi_value, psi_p = psi(*counts)
    else:
        statistic, p_ks, effect, psi_value, psi_p = 0.0, 1.0, 0.0, 0.0, 1.0
    # Two tests of one column: the smaller p-value, Bonferroni-doubled (when both apply).
    p_value = min(1.0, 2 * min(p_ks, p_missing)) if p_missing < 1.0 else p_ks
    return ColumnTest(
        name,
        "numeric",
        role,
        "ks",
        statistic,
        p_value,
        effect,
        "wasserstein_sd",
        psi_value,
        psi_p,
        len(ref_all),
        len(cur_all),
        _share(ref_all, ref),
        _share(cur_all, cur),
    )


def _share(all_values: np.ndarray, present: np.ndarray) -> float:
    return float(1 - len(present) / len(all_values)) if len(all_values) else 0.0


def category_counts(reference, current) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(categories, reference counts, current counts); a missing value is its own category."""
    ref = ["<missing>" if v is None else str(v) for v in reference]
    cur = ["<missing>" if v is None else str(v) for v in current]
    names = sorted(set(ref) | set(cur))
    index = {name: i for i, name in enumerate(names)}
    count = lambda values: np.bincount([index[v] for v in values], minlength=len(names))  # noqa: E731
    return names, count(ref), count(cur)


def _pooled(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Categories expected fewer than 5 times on a side pooled into one (chi²'s condition)."""
    total = ref + cur
    expected = np.minimum(total * ref.sum(), total * cur.sum()) / max(total.sum(), 1)
    rare = expected < _MIN_EXPECTED
    if rare.sum() <= 1:
        return ref, cur
    keep = ~rare
    return np.append(ref[keep], ref[rare].sum()), np.append(cur[keep], cur[rare].sum())


def categorical_test(name: str, role: str, reference, current) -> ColumnTest:
    """chi² on the category counts; Jensen–Shannon distance and PSI beside."""
    _, ref_counts, cur_counts = category_counts(reference, current)
    ref_p, cur_p = _pooled(ref_counts, cur_counts)
    if len(ref_p) >= 2 and ref_p.sum() and cur_p.sum():
        chi2, p_value = stats.chi2_contingency(np.stack([ref_p, cur_p]))[:2]
        statistic, p_value = float(chi2), float(p_value)
    else:
        statistic, p_value = 0.0, 1.0
    effect = js_distance(ref_counts, cur_counts)
    psi_value, psi_p = psi(ref_counts, cur_counts)
    missing = lambda values: float(np.mean([v is None for v in values])) if len(values) else 0.0  # noqa: E731
    return ColumnTest(
        name,
        "categorical",
        role,
        "chi2",
        statistic,
        p_value,
        effect,
        "jensen_shannon",
        psi_value,
        psi_p,
        len(reference),
        len(current),
        missing(reference),
        missing(current),
    )


def js_distance(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """Jensen–Shannon distance (base 2, in [0, 1]) of two count vectors."""
    ref, cur = np.asarray(ref_counts, np.float64), np.asarray(cur_counts, np.float64)
    if not ref.sum() or not cur.sum():
        return 0.0
    return float(distance.jensenshannon(ref / ref.sum(), cur / cur.sum(), base=2))


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (step-down; reject where adjusted <= alpha)."""
    p = np.asarray(p_values, np.float64)
    m = len(p)
    if not m:
        return p
    order = np.argsort(p)
    stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


def gated(test: ColumnTest) -> bool:
    """Whether a significant column is also large enough to call drift (large samples)."""
    if min(test.n_reference, test.n_current) <= LARGE_SAMPLE:
        return True
    missing_shift = abs(test.missing_current - test.missing_reference)
    return test.effect >= EFFECT_THRESHOLD or missing_shift >= EFFECT_THRESHOLD


def token_test(name: str, role: str, reference, current, *, permutations: int, seed: int):
    """Jensen–Shannon distance of two token distributions, given as per-document count rows
    [documents, tokens]; its p-value from a permutation null that shuffles whole documents
    (tokens of one document are not independent, so a chi² over pooled tokens would alarm on
    same-distribution text)."""
    ref, cur = np.asarray(reference, np.float64), np.asarray(current, np.float64)
    observed = js_distance(ref.sum(0), cur.sum(0))
    pooled, n = np.concatenate([ref, cur]), len(ref)
    rng = np.random.default_rng(seed)
    exceed = 0
    for _ in range(permutations):
        order = rng.permutation(len(pooled))
        exceed += js_distance(pooled[order[:n]].sum(0), pooled[order[n:]].sum(0)) >= observed
    p_value = (1 + exceed) / (1 + permutations)
    psi_value, psi_p = psi(ref.sum(0), cur.sum(0))
    return ColumnTest(
        name,
        "tokens",
        role,
        f"js_permutation_{permutations}",
        observed,
        p_value,
        observed,
        "jensen_shannon",
        psi_value,
        psi_p,
        len(ref),
        len(cur),
        0.0,
        0.0,
    )
