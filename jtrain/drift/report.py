"""The drift report: every column of the new data tested against the profile's sample, the
domain classifier on the whole rows, one Holm correction over all of them, and
a verdict naming what drifted.

A column drifts when its corrected p-value is at most `alpha` (and, in large samples, its
effect is large enough: `stats.gated`); the data drifts when any column or the domain
classifier does. Features are the data's own columns; the model's predictions and loss are
reported apart (`drifting_outputs`), since they move because the features did.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jtrain.drift import domain, stats
from jtrain.drift.profile import ProfileError, Sample

ALPHA = 0.05
TOKEN_PERMUTATIONS = 400  # p-values down to 1/401, below alpha / tests (Holm) for text
DOMAIN = "domain_classifier"
_TESTS = {"numeric": stats.numeric_test, "categorical": stats.categorical_test}


def column_tests(reference: Sample, current: Sample, *, seed: int = 0) -> list[stats.ColumnTest]:
    """One test per column of the reference (uncorrected)."""
    missing = [name for name in reference.columns if name not in current.columns]
    if missing:
        raise ProfileError(
            f"the new data lacks the profile's columns {missing}; give data with them"
        )
    out = []
    for name, ref in reference.columns.items():
        cur = current.columns[name]
        if ref.kind == "tokens":
            out.append(
                stats.token_test(
                    name,
                    ref.role,
                    ref.values,
                    cur.values,
                    permutations=TOKEN_PERMUTATIONS,
                    seed=seed,
                )
            )
        else:
            out.append(_TESTS[ref.kind](name, ref.role, ref.values, cur.values))
    return out


def domain_inputs(reference: Sample, current: Sample) -> tuple[np.ndarray, np.ndarray]:
    """What the domain classifier reads: the samples' embeddings (images: the model's
    features; text: token frequencies), else their encoded feature columns (tables)."""
    if reference.embedding is not None and current.embedding is not None:
        return reference.embedding, current.embedding
    return domain.encode_table(_table_features(reference), _table_features(current))


def _table_features(sample: Sample) -> dict:
    return {
        name: (c.kind, c.values)
        for name, c in sample.columns.items()
        if c.role == "feature" and c.kind != "tokens"
    }


def compare(
    reference: Sample,
    current: Sample,
    *,
    alpha: float = ALPHA,
    permutations: int = domain.PERMUTATIONS,
    seed: int = 0,
) -> dict:
    """The report as a JSON-ready dict (see the module docstring)."""
    if not current.columns or not len(next(iter(current.columns.values())).values):
        raise ProfileError("the new data has no rows to compare")
    tests = column_tests(reference, current, seed=seed)
    dom = None
    if permutations > 0:
        dom = domain.domain_test(
            *domain_inputs(reference, current), permutations=permutations, seed=seed
        )
    p_values = [t.p_value for t in tests] + ([dom.p_value] if dom else [])
    adjusted = stats.holm(p_values)
    tests = [
        dataclasses.replace(t, p_adjusted=float(p), drift=bool(p <= alpha and stats.gated(t)))
        for t, p in zip(tests, adjusted, strict=False)
    ]
    domain_entry = None
    if dom:
        p_adj = float(adjusted[-1])
        # As for columns, large samples need an effect too: an AUC of at least 0.55.
        large = min(dom.n_reference, dom.n_current) > stats.LARGE_SAMPLE
        flagged = p_adj <= alpha and (not large or dom.auc >= 0.5 + stats.EFFECT_THRESHOLD / 2)
        domain_entry = {**dataclasses.asdict(dom), "p_adjusted": p_adj, "drift": bool(flagged)}
    features = [t.name for t in tests if t.drift and t.role == "feature"]
    outputs = [t.name for t in tests if t.drift and t.role != "feature"]
    drift = bool(features or outputs or (domain_entry and domain_entry["drift"]))
    return {
        "drift": drift,
        "verdict": _verdict(drift, features, outputs, domain_entry),
        "drifting_features": features,
        "drifting_outputs": outputs,
        "alpha": alpha,
        "correction": "holm over every column and the domain classifier",
        "domain_classifier": domain_entry,
        "columns": [dataclasses.asdict(t) for t in tests],
        "rows": {"reference": reference.rows, "current": current.rows},
    }


def _verdict(drift: bool, features: list, outputs: list, dom: dict | None) -> str:
    if not drift:
        return "no drift: every test is consistent with the reference"
    parts = []
    if features:
        parts.append(f"features {', '.join(features)}")
    if outputs:
        parts.append(f"the model's {', '.join(outputs)}")
    if dom and dom["drift"]:
        parts.append(f"the rows as a whole (domain classifier AUC {dom['auc']:.3f})")
    return "drift in " + "; ".join(parts)


def summary_lines(report: dict) -> list[str]:
    """The printed summary: the verdict, then one line per drifting test."""
    lines = [f"jtrain.drift: {report['verdict']}"]
    for t in report["columns"]:
        if t["drift"]:
            lines.append(
                f"  {t['name']} ({t['role']}): {t['test']} p={t['p_value']:.2g} "
                f"(corrected {t['p_adjusted']:.2g}), {t['effect_name']} {t['effect']:.3f}, "
                f"PSI {t['psi']:.3f}"
            )
    dom = report["domain_classifier"]
    if dom:
        lines.append(
            f"  domain classifier: AUC {dom['auc']:.3f}, null 95% [{dom['null_low']:.3f}, "
            f"{dom['null_high']:.3f}], p={dom['p_value']:.2g}"
        )
    return lines
