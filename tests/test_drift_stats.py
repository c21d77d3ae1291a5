"""The drift statistics on synthetic tables: the false-alarm rate of the whole report on
same-distribution data is at most 5%, shifted columns are found and named, the domain
classifier is calibrated and sees what no single column shows, large samples need a real
effect, and the correction and PSI are the textbook ones."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from jtrain.drift import domain, report, stats
from jtrain.drift.profile import Column, Sample
from tests import drift_synthetic as synthetic

REFERENCE_ROWS, NEW_ROWS = 2000, 300


@pytest.fixture(scope="module")
def reference():
    return synthetic.sample(synthetic.table(REFERENCE_ROWS, np.random.default_rng(1000)))


def _new(seed: int, shift: dict | None = None) -> Sample:
    return synthetic.sample(synthetic.table(NEW_ROWS, np.random.default_rng(seed), shift))


def test_false_alarms_on_same_distribution_data_are_at_most_5_percent():
    # 80 independent trials, each a fresh reference (as a new run's profile would be) and new
    # sample. If the report's false-alarm rate is at most 5%, alarms ~ Binomial(80, <=0.05):
    # mean <= 4, P(alarms >= 9) <= 0.021; so more than 8 would mean the rate is above 5%
    # (the seeds are fixed, so the outcome is reproducible).
    alarms = 0
    for seed in range(80):
        rng = np.random.default_rng(seed)
        reference = synthetic.sample(synthetic.table(REFERENCE_ROWS, rng))
        new = synthetic.sample(synthetic.table(NEW_ROWS, rng))
        alarms += report.compare(reference, new, permutations=0)["drift"]
    assert alarms <= 8


def test_shifted_columns_are_detected_and_named(reference):
    shift = {"counts": 0.75, "colour": 0.35}  # 3/4 of a Poisson sd; red 25% -> 44%
    named = [
        report.compare(reference, _new(100 + s, shift), permutations=0)["drifting_features"]
        for s in range(30)
    ]
    assert all(names for names in named)  # drift found every time
    exact = sum(sorted(names) == ["colour", "counts"] for names in named)
    assert exact >= 27  # both named, nothing else, in at least 90% of trials


def test_the_domain_classifier_is_calibrated_and_pools_small_shifts(reference):
    null = [
        domain.domain_test(*report.domain_inputs(reference, _new(200 + s)), permutations=10, seed=s)
        for s in range(20)
    ]
    # Binomial(20, 0.05): P(>= 4 of 20 below 0.05) = 0.016.
    assert sum(r.p_value < 0.05 for r in null) <= 3
    assert all(r.null_low < 0.5 < r.null_high for r in null)
    small = dict.fromkeys(synthetic.NUMERIC, 0.15)  # too small for most columns' own tests
    shifted = report.compare(reference, _new(300, small), permutations=10)
    assert shifted["domain_classifier"]["drift"]
    assert shifted["domain_classifier"]["auc"] > shifted["domain_classifier"]["null_high"]


def test_large_samples_need_an_effect_not_only_a_p_value():
    rng = np.random.default_rng(0)
    ref, cur = rng.normal(0, 1, 20000), rng.normal(0.05, 1, 20000)  # real, but negligible
    tiny = stats.numeric_test("x", "feature", ref, cur)
    assert tiny.p_value < 1e-4 and tiny.effect < stats.EFFECT_THRESHOLD
    assert not stats.gated(tiny)
    assert stats.gated(stats.numeric_test("x", "feature", ref, rng.normal(0.3, 1, 20000)))


def test_holm_matches_the_step_down_rule():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 -> x4, x3, x2, x1 = 0.04, 0.09, 0.08, 0.5, then made
    # monotone from the bottom: 0.04, 0.09, 0.09, 0.5.
    np.testing.assert_allclose(stats.holm(p), [0.04, 0.09, 0.09, 0.5])


def test_psi_and_its_p_value():
    ref, cur = np.array([100, 100, 100, 100]), np.array([100, 100, 100, 100])
    assert stats.psi(ref, cur) == (0.0, 1.0)
    value, p = stats.psi(np.array([500, 500]), np.array([400, 600]))
    expected = 0.1 * np.log(0.6 / 0.5) - 0.1 * np.log(0.4 / 0.5)  # sum (q - p) ln(q / p)
    assert value == pytest.approx(expected, rel=1e-2)
    assert p == pytest.approx(scipy_stats.chi2.sf(value / (2 / 1000), 1), rel=1e-6)


def test_missing_values_and_categories_are_tested():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 1000)
    cur = rng.normal(0, 1, 300)
    cur[:60] = np.nan  # 20% missing, none in the reference
    test = stats.numeric_test("x", "feature", ref, cur)
    assert test.missing_current == pytest.approx(0.2) and test.p_value < 1e-6
    same = stats.categorical_test("c", "feature", ["a", "b"] * 500, ["a", "b", None] * 100)
    assert same.p_value < 1e-6 and same.missing_current == pytest.approx(1 / 3)


def test_token_distributions_are_compared_by_whole_documents():
    rng = np.random.default_rng(0)
    topics = rng.dirichlet(np.ones(20), size=2)  # two kinds of document, mixed in both

    def docs(n: int, seed: int) -> np.ndarray:
        return np.stack(
            [np.random.default_rng(seed + i).multinomial(400, topics[i % 2]) for i in range(n)]
        )

    same = stats.token_test("t", "feature", docs(60, 0), docs(20, 1000), permutations=200, seed=0)
    assert same.p_value > 0.05  # a chi² over the 8,000 pooled tokens would reject here
    other = np.stack([rng.multinomial(400, rng.dirichlet(np.ones(20))) for _ in range(20)])
    assert (
        stats.token_test("t", "feature", docs(60, 0), other, permutations=200, seed=0).p_value
        < 0.01
    )


def test_columns_the_new_data_lacks_are_an_error(reference):
    columns = dict(reference.columns)
    del columns["normal"]
    with pytest.raises(report.ProfileError, match="normal"):
        report.compare(reference, Sample(columns, rows=2000), permutations=0)


def test_an_empty_sample_is_an_error(reference):
    empty = {n: Column(n, c.kind, c.role, c.values[:0]) for n, c in reference.columns.items()}
    with pytest.raises(report.ProfileError, match="no rows"):
        report.compare(reference, Sample(empty), permutations=0)
