"""The figures a finished training run leaves in WORKDIR/plots/: curves.png (`jtrain.plot`,
from its metrics.jsonl) and the task's own (`Task.figures`) as NAME.png.

Figures are a convenience: a failure to draw one (matplotlib missing, a damaged metrics.jsonl,
a task's figure that raises) prints one line saying why and how to get it, and never fails a
run whose training, checkpoints and metrics are already done.
"""

from __future__ import annotations

import os
import re

import jax

from jtrain import plot
from jtrain.errors import UserError
from jtrain.hooks import Hook

CURVES = "curves"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a file name, no directory


class Plots(Hook):
    """Draws the run's figures after everything else has ended (process 0). Not when
    preempted: the grace period is for saving, and the resumed run draws them at its end."""

    def on_end(self, loop, state, *, preempted) -> None:
        if preempted or jax.process_index() != 0:
            return
        loop.writer.flush()
        write_figures(loop.workdir, loop.exp.task)


def write_figures(workdir: str, task) -> list[str]:
    """Writes WORKDIR/plots/curves.png and the task's figures; returns the paths written."""
    directory = os.path.join(workdir, "plots")
    curves = os.path.join(directory, f"{CURVES}.png")
    get_it = f"python -m jtrain.plot {workdir} --output={curves}"
    try:
        plot.require_matplotlib()
    except plot.PlotError as err:
        print(f"jtrain: no plots written ({err}); then draw them with: {get_it}", flush=True)
        return []
    written = []
    try:
        written.append(plot.save([workdir], curves))
    except Exception as err:  # drawing must never cost a finished run
        print(
            f"jtrain: no plot written to {curves} ({_why(err)}); draw it with: {get_it}", flush=True
        )
    try:
        figures = task.figures(workdir)
    except Exception as err:
        print(f"jtrain: the task's figures were not drawn ({_why(err)})", flush=True)
        return written
    for name, fig in figures.items():
        path = os.path.join(directory, f"{name}.png")
        try:
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name == CURVES:
                raise ValueError(f"{name!r} is not a file name of its own: rename the figure")
            written.append(plot.write(fig, path))
        except Exception as err:
            print(f"jtrain: no plot written to {path} ({_why(err)})", flush=True)
    return written


def _why(err: Exception) -> str:
    """The error on one line (with its type unless it is a message meant for the user)."""
    text = " ".join(str(err).split())
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"
