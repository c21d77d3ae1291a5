"""report.html: the verdict, every test in a table, and reference-vs-new histograms of each
drifting column (inline PNGs). Without matplotlib (the `plot` extra) the page is written
all the same, with a line saying how to get the plots."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from jtrain.drift.profile import Sample
from jtrain.extras import MissingExtraError, need

_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "tr.drift{background:#fdd}.no{color:#060}.yes{color:#a00}"
)
_FIELDS = (
    "name",
    "role",
    "test",
    "p_value",
    "p_adjusted",
    "effect_name",
    "effect",
    "psi",
    "missing_reference",
    "missing_current",
    "drift",
)


def page(report: dict, reference: Sample | None, current: Sample | None) -> str:
    """The whole page as text."""
    verdict = "yes" if report["drift"] else "no"
    parts = [
        f"<!doctype html><meta charset=utf-8><title>jtrain drift report</title>"
        f"<style>{_STYLE}</style><h1>Drift report</h1>",
        f"<p class={verdict}><b>{html.escape(report['verdict'])}</b></p>",
        f"<p>reference: {html.escape(str(report.get('reference', {})))}<br>"
        f"new data: {html.escape(str(report.get('current', {})))}<br>"
        f"alpha {report['alpha']}, {html.escape(report['correction'])}</p>",
    ]
    dom = report.get("domain_classifier")
    if dom:
        parts.append(
            f"<p>domain classifier: cross-validated AUC {dom['auc']:.3f}, permutation null 95% "
            f"[{dom['null_low']:.3f}, {dom['null_high']:.3f}], p {dom['p_value']:.3g}, "
            f"corrected {dom['p_adjusted']:.3g}</p>"
        )
    parts.append(_table(report["columns"]))
    parts.append(_plots(report, reference, current))
    return "\n".join(parts)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(columns: list[dict]) -> str:
    head = "".join(f"<th>{name}</th>" for name in _FIELDS)
    rows = [
        f"<tr class={'drift' if c['drift'] else 'same'}>"
        + "".join(f"<td>{_cell(c[name])}</td>" for name in _FIELDS)
        + "</tr>"
        for c in columns
    ]
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _plots(report: dict, reference: Sample | None, current: Sample | None) -> str:
    drifting = [c["name"] for c in report["columns"] if c["drift"] and c["kind"] != "tokens"]
    if not drifting or reference is None or current is None:
        return ""
    try:
        need("matplotlib", extra="plot", use="the drift report's plots")
    except MissingExtraError as err:
        return f"<p>No plots: {html.escape(str(err))}</p>"
    return "".join(
        f"<h3>{html.escape(name)}</h3><img src='data:image/png;base64,"
        f"{_figure(reference.columns[name], current.columns[name])}'>"
        for name in drifting
    )


def _figure(reference, current) -> str:
    """A reference-vs-new histogram of one column, as base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    if reference.kind == "numeric":
        ref, cur = (v[np.isfinite(v)] for v in (reference.values, current.values))
        bins = np.histogram_bin_edges(np.concatenate([ref, cur]), bins=30)
        ax.hist(ref, bins=bins, density=True, alpha=0.5, label="reference")
        ax.hist(cur, bins=bins, density=True, alpha=0.5, label="new")
    else:
        names = sorted({str(v) for v in (*reference.values, *current.values)})[:30]
        x = np.arange(len(names))
        for offset, values, label in (
            (-0.2, reference.values, "reference"),
            (0.2, current.values, "new"),
        ):
            text = [str(v) for v in values]
            ax.bar(x + offset, [text.count(n) / max(len(text), 1) for n in names], 0.4, label=label)
        ax.set_xticks(x, names, rotation=45, fontsize=7)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
