"""Training curves: the train and validation history of one or more runs, one subplot per
metric, drawn from each run's metrics.jsonl.

    python -m jtrain.plot RUN [RUN ...] [--metrics=loss,accuracy] --output=FILE.png

Each run gets a colour, labelled by its directory name, and each split a style: train a solid
line, val a dashed one with dots, the test event (once, at the end) a star. Only the surviving
history is drawn: a `resume` event at step S supersedes what a killed run had logged after S,
and a later value of the same metric at the same step replaces an earlier one. A non-finite
value leaves a gap in its line and a cross at the bottom of the subplot.

matplotlib is an optional extra (`pip install "jtrain[plot]"`), imported only when drawing so
`import jtrain` stays light. Figures are drawn on an Agg canvas without pyplot: nothing opens
a window, and no figure outlives its caller.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from absl import app, flags

from jtrain import atomic, cli, errors
from jtrain.errors import UserError
from jtrain.metrics import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL = 'pip install "jtrain[plot]"'
SPLITS = ("train", "val", "test")
# The metrics a task is judged by, drawn by default where logged: the loss; the accuracy of
# lm, sft, classify and reward runs; DPO's preference accuracy; GRPO's reward.
MAIN_METRICS = ("loss", "accuracy", "rewards/accuracies", "reward")
# Once-per-run values (compilation, the whole run's time), not curves.
_NOT_CURVES = frozenset({"step", "split", "compile_time", "wall_time"})
_STYLES = {
    "train": {"linestyle": "-", "linewidth": 1.5},
    "val": {"linestyle": "--", "linewidth": 1.5, "marker": "o", "markersize": 3},
    "test": {"linestyle": "none", "marker": "*", "markersize": 11},
}
_DPI = 120

Curves = dict[str, dict[str, dict[int, float]]]  # split -> metric -> step -> value


class PlotError(UserError, ValueError):
    """Runs, metrics or an output that cannot be drawn; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run's surviving history, as read from its metrics.jsonl."""

    name: str  # the legend label: the run's directory name
    path: str  # its metrics.jsonl
    curves: Curves

    def metrics(self) -> set[str]:
        """The metrics with at least one point in some split."""
        return {name for split in self.curves.values() for name, s in split.items() if s}

    def points(self, split: str, metric: str) -> tuple[list[int], list[float]]:
        """(steps ascending, values) of one split's metric; empty when never logged."""
        series = self.curves.get(split, {}).get(metric, {})
        steps = sorted(series)
        return steps, [series[step] for step in steps]


def surviving(events: Iterable[Mapping]) -> Curves:
    """The train/val/test values of events in logged order, each `resume` at step S dropping
    the values logged for steps after S before it (lost to a kill, logged again after it)."""
    curves: Curves = {split: {} for split in SPLITS}
    for event in events:
        step, split = event.get("step"), event.get("split")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if split == "resume":
            for series in (s for by_metric in curves.values() for s in by_metric.values()):
                for lost in [s for s in series if s > step]:
                    del series[lost]
        elif split in curves:
            for name, value in event.items():
                if name not in _NOT_CURVES and _is_number(value):
                    curves[split].setdefault(name, {})[step] = float(value)
    return curves


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load(run: str, name: str | None = None) -> Run:
    """A run directory's (or a metrics.jsonl file's) surviving history."""
    if os.path.isdir(run):
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.isfile(path):
            raise PlotError(
                f"{run} has no metrics.jsonl: not a jtrain workdir, or its run has not logged "
                "anything yet; name the --workdir of a run"
            )
    elif os.path.isfile(run) and run.endswith(".jsonl"):
        path = run
    elif os.path.exists(run):
        raise PlotError(f"{run} is not a run directory: name the --workdir of a jtrain run")
    else:
        raise PlotError(f"{run}: no such run directory; name the --workdir of a jtrain run")
    try:
        events = read_metrics(path)
    except UnicodeDecodeError as err:
        raise PlotError(f"{path} is not a metrics.jsonl (not text at byte {err.start})") from err
    curves = surviving(e for e in events if isinstance(e, dict))
    return Run(name or _names([run])[0], path, curves)


def _names(runs: Sequence[str]) -> list[str]:
    """Each run's directory name; the paths as given where two names would be the same."""
    dirs = [os.path.normpath(_directory(run)) for run in runs]
    names = [os.path.basename(os.path.abspath(d)) for d in dirs]
    return [n if names.count(n) == 1 else d for n, d in zip(names, dirs, strict=True)]


def _directory(run: str) -> str:
    return (os.path.dirname(run) or ".") if run.endswith(".jsonl") else run


def _chosen(runs: Sequence[Run], wanted: Sequence[str] | None) -> list[str]:
    """The metrics to draw: those asked for, each logged by some run, or the main ones."""
    available = sorted(set().union(*(run.metrics() for run in runs)))
    listed = ", ".join(available)
    if not available:
        where = ", ".join(run.path for run in runs)
        raise PlotError(f"nothing to draw: no train, val or test metric is logged in {where}")
    if not wanted:
        chosen = [name for name in MAIN_METRICS if name in available]
        if not chosen:
            raise PlotError(
                f"the runs log none of {', '.join(MAIN_METRICS)}; choose with --metrics among: "
                + listed
            )
        return chosen
    missing = [name for name in wanted if name not in available]
    if missing:
        raise PlotError(f"no run logs the metric {missing[0]!r}; the metrics available: {listed}")
    return list(dict.fromkeys(wanted))


def _matplotlib() -> types.SimpleNamespace:
    """The matplotlib classes drawing uses, or a PlotError saying how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:
        raise PlotError(f"drawing needs matplotlib, which is not installed: {INSTALL}") from err

    class ShownFigure(Figure):
        """A Figure that a notebook shows (as a PNG) although pyplot never saw it."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png")
            return buffer.getvalue()

    return types.SimpleNamespace(
        Figure=ShownFigure, FigureCanvasAgg=FigureCanvasAgg, Line2D=Line2D, MaxNLocator=MaxNLocator
    )


def require_matplotlib() -> None:
    """Raises the PlotError of `figure` when matplotlib cannot be imported."""
    _matplotlib()


def figure(runs: Sequence[str], metrics: Sequence[str] | None = None) -> Figure:
    """The runs' train and val curves (and test points), one subplot per metric; by default
    `MAIN_METRICS` where logged."""
    runs = [runs] if isinstance(runs, str) else list(runs)
    if not runs:
        raise PlotError("name the runs to draw: one run directory or more")
    if isinstance(metrics, str):
        metrics = metrics.split(",")
    metrics = [name.strip() for name in metrics or () if name.strip()]
    mpl = _matplotlib()
    loaded = [load(run, name) for run, name in zip(runs, _names(runs), strict=True)]
    chosen = _chosen(loaded, metrics)
    cols = min(len(chosen), 3)
    rows = math.ceil(len(chosen) / cols)
    fig = mpl.Figure(figsize=(4.8 * cols, 3.2 * rows + 0.5), layout="constrained")
    mpl.FigureCanvasAgg(fig)  # attaches itself: rendering never goes through a GUI backend
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    drawn = set()
    for ax, metric in zip(axes, chosen, strict=False):  # axes past the metrics: hidden below
        for i, run in enumerate(loaded):
            drawn |= _draw(ax, run, metric, color=f"C{i % 10}")
        ax.set(title=metric, xlabel="step")
        ax.xaxis.set_major_locator(mpl.MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
    for ax in axes[len(chosen) :]:
        ax.set_visible(False)
    handles = [mpl.Line2D([], [], color=f"C{i % 10}", label=r.name) for i, r in enumerate(loaded)]
    for split in (s for s in SPLITS if s in drawn):
        handles.append(mpl.Line2D([], [], color="0.35", label=split, **_STYLES[split]))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6))
    return fig


def _draw(ax, run: Run, metric: str, *, color: str) -> set[str]:
    """Draws one run's metric on ax, a line (or points) per split; returns the splits drawn."""
    drawn = set()
    for split in SPLITS:
        steps, values = run.points(split, metric)
        if not steps:
            continue
        style = dict(_STYLES[split])
        if len(steps) == 1:  # a line through one point would be invisible
            style.setdefault("marker", "o")
            style.setdefault("markersize", 4)
        finite = [v if math.isfinite(v) else math.nan for v in values]
        ax.plot(steps, finite, color=color, label=f"{run.name} {split}", **style)
        drawn.add(split)
        bad = [step for step, v in zip(steps, values, strict=True) if not math.isfinite(v)]
        if bad:  # at the bottom of the subplot: x in steps, y in axes fractions
            ax.plot(
                bad,
                [0.03] * len(bad),
                "x",
                color=color,
                transform=ax.get_xaxis_transform(),
                label=f"{run.name} {split} non-finite",
            )
    return drawn


def write(fig: Figure, path: str) -> str:
    """Saves fig at path whole (a reader never sees half), in the format its extension names
    (png, pdf, svg, ...); returns path."""
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    formats = fig.canvas.get_supported_filetypes()
    if extension not in formats:
        raise PlotError(
            f"{path}: its extension names the image format; end it with .png, .pdf or .svg "
            f"(or another format matplotlib writes: {', '.join(sorted(formats))})"
        )
    atomic.write(path, lambda temporary: fig.savefig(temporary, format=extension, dpi=_DPI))
    return path


def save(runs: Sequence[str], output: str, metrics: Sequence[str] | None = None) -> str:
    """Draws `figure(runs, metrics)` to output (png, pdf, svg, ...); returns the path written."""
    return write(figure(runs, metrics), output)


def _define_flags() -> None:
    """Defines the CLI flags once (main may run more than once in a process), and only when
    run: importing this module never claims flag names."""
    if "metrics" not in flags.FLAGS:
        flags.DEFINE_list(
            "metrics",
            None,
            "Metrics to draw, one subplot each (default: loss and accuracy "
            "or reward, where logged).",
        )
    if "output" not in flags.FLAGS:
        flags.DEFINE_string("output", None, "The image to write (.png, .pdf, .svg).")
    for name in ("metrics", "output"):  # a previous call's values must not carry over
        flags.FLAGS[name].unparse()


def _main(argv: list[str]) -> None:
    runs, f = argv[1:], flags.FLAGS
    if not runs:
        raise app.UsageError("name the runs: python -m jtrain.plot RUN [RUN ...] --output=FILE.png")
    if not f.output:
        raise app.UsageError("--output=FILE.png is required: the image to write")
    with errors.reported():
        path = save(runs, f.output, f.metrics)
    print(f"jtrain: wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m jtrain.plot` and the `jtrain-plot` script (argv: sys.argv when None); exits."""
    _define_flags()
    app.run(_main, argv=list(argv) if argv is not None else None, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()
