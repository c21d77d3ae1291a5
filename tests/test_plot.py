"""jtrain.plot: curves drawn from hand-written metrics.jsonl files (a resume superseding lost
steps, several runs, non-finite values, errors), the command line called in-process, and the
plots a real tiny run leaves in WORKDIR/plots/ (the curves, and a task's own figure)."""

import json
import math
import os
import sys

import pytest
from PIL import Image

from jtrain import plot, plot_hook, run
from jtrain.metrics import read_metrics
from jtrain.tasks.base import Task
from jtrain.tasks.lm import LMTask
from tests.conftest import tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A run killed after step 6 had been logged (and validated) but only step 4 checkpointed:
# the resume at 4 supersedes both, and step 6 is logged again.
RESUMED = [
    {"step": 1, "split": "train", "compile_time": 3.0},
    {"step": 2, "split": "train", "loss": 2.0, "accuracy": 0.1, "lr": 1e-3},
    {"step": 4, "split": "train", "loss": 1.8, "accuracy": 0.2, "lr": 1e-3},
    {"step": 4, "split": "val", "loss": 1.9, "accuracy": 0.15},
    {"step": 6, "split": "train", "loss": 1.7, "accuracy": 0.25, "lr": 1e-3},
    {"step": 6, "split": "val", "loss": 1.75, "accuracy": 0.2},
    {"step": 4, "split": "resume", "redone_steps": 2},
    {"step": 5, "split": "train", "compile_time": 3.0},
    {"step": 6, "split": "train", "loss": 1.6, "accuracy": 0.3, "lr": 1e-3},
    {"step": 8, "split": "train", "loss": 1.5, "accuracy": 0.35, "lr": 5e-4},
    {"step": 8, "split": "val", "loss": 1.55, "accuracy": 0.3},
    {"step": 8, "split": "test", "loss": 1.58, "accuracy": 0.29},
    {"step": 8, "split": "train", "wall_time": 12.0},
]
# Loss only (no accuracy), two non-finite train losses and a single validation.
NONFINITE = [
    {"step": 2, "split": "train", "loss": 2.1},
    {"step": 4, "split": "train", "loss": float("nan")},
    {"step": 6, "split": "train", "loss": float("inf")},
    {"step": 8, "split": "train", "loss": 1.4},
    {"step": 8, "split": "val", "loss": 1.45},
]


def _write_run(directory, events) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(event) + "\n" for event in events)
    return str(directory)


def _lines(fig) -> dict[tuple[str, str], tuple[list, list]]:
    """{(subplot title, line label): (steps, values)} of every line the figure draws."""
    return {
        (ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
        for ax in fig.axes
        for line in ax.get_lines()
    }


def _colour(fig, title: str, label: str):
    ax = next(ax for ax in fig.axes if ax.get_title() == title)
    return next(line.get_color() for line in ax.get_lines() if line.get_label() == label)


@pytest.fixture
def runs(tmp_path) -> tuple[str, str]:
    return _write_run(tmp_path / "a", RESUMED), _write_run(tmp_path / "b", NONFINITE)


def test_a_resume_supersedes_the_steps_logged_after_it(runs):
    fig = plot.figure([runs[0]])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    lines = _lines(fig)
    assert lines["loss", "a train"] == ([2, 4, 6, 8], [2.0, 1.8, 1.6, 1.5])
    assert lines["loss", "a val"] == ([4, 8], [1.9, 1.55])
    assert lines["loss", "a test"] == ([8], [1.58])
    assert lines["accuracy", "a train"] == ([2, 4, 6, 8], [0.1, 0.2, 0.3, 0.35])
    assert len(lines) == 6  # compile_time and wall_time events draw nothing
    ax = fig.axes[0]
    styles = {line.get_label(): (line.get_linestyle(), line.get_marker()) for line in ax.lines}
    assert styles == {"a train": ("-", "None"), "a val": ("--", "o"), "a test": ("None", "*")}


def test_several_runs_share_a_figure_with_a_colour_each(runs):
    fig = plot.figure(list(runs))
    lines = _lines(fig)
    # b logs no accuracy: its subplot holds a's lines only.
    assert {label for title, label in lines if title == "accuracy"} == {
        "a train",
        "a val",
        "a test",
    }
    steps, values = lines["loss", "b train"]
    assert steps == [2, 4, 6, 8] and values[0] == 2.1 and values[3] == 1.4
    assert math.isnan(values[1]) and math.isnan(values[2])  # gaps, not infinite axes
    assert lines["loss", "b train non-finite"][0] == [4, 6]
    assert lines["loss", "b val"] == ([8], [1.45])
    a, b = _colour(fig, "loss", "a train"), _colour(fig, "loss", "b train")
    assert a != b and _colour(fig, "loss", "a val") == a == _colour(fig, "accuracy", "a train")
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["a", "b", "train", "val", "test"]


def test_save_writes_the_image_whole_and_returns_its_path(runs, tmp_path):
    output = str(tmp_path / "out" / "curves.png")
    assert plot.save(list(runs), output, ["loss"]) == output
    with open(output, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.listdir(tmp_path / "out") == ["curves.png"]  # no temporary file left
    with pytest.raises(plot.PlotError, match=r"end it with \.png, \.pdf or \.svg"):
        plot.save(list(runs), str(tmp_path / "curves.txt"))


def test_errors_name_the_run_or_list_the_available_metrics(runs, tmp_path):
    with pytest.raises(plot.PlotError, match="nowhere: no such run directory"):
        plot.figure([runs[0], str(tmp_path / "nowhere")])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(plot.PlotError, match="empty has no metrics.jsonl"):
        plot.figure([str(tmp_path / "empty")])
    with pytest.raises(plot.PlotError) as err:
        plot.figure(list(runs), ["loss", "bleu"])
    assert "'bleu'" in str(err.value) and "accuracy, loss, lr" in str(err.value)
    assert "compile_time" not in str(err.value)


def _main(*argv: str) -> object:
    """jtrain.plot.main's exit code (None: success; a string: the error line)."""
    with pytest.raises(SystemExit) as exit_:
        plot.main(["jtrain.plot", *argv])
    return exit_.value.code


def test_the_command_line(runs, tmp_path, capsys):
    first, second = str(tmp_path / "1.png"), str(tmp_path / "2.png")
    assert _main(*runs, "--metrics=lr", f"--output={first}") is None
    assert f"jtrain: wrote {first}" in capsys.readouterr().out
    assert Image.open(first).size[0] < 800  # one subplot
    # A second call in the process starts from the defaults (loss, accuracy: two subplots):
    # the first call's --metrics=lr does not carry over.
    assert _main(runs[0], f"--output={second}") is None
    assert Image.open(second).size[0] > 800
    assert _main(runs[0], "nowhere", f"--output={second}").startswith("error: nowhere: no such")
    code = _main(*runs, "--metrics=bleu", f"--output={second}")
    assert code.startswith("error: no run logs the metric 'bleu'") and "\n" not in code


def test_without_matplotlib_one_line_says_how_to_install_it(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if absent
    code = _main(*runs, f"--output={tmp_path / 'x.png'}")
    assert (
        code
        == 'error: drawing needs matplotlib, which is not installed: pip install "jtrain[plot]"'
    )
    assert plot_hook.write_figures(runs[0], Task(None)) == []
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and 'pip install "jtrain[plot]"' in out[0]
    assert f"python -m jtrain.plot {runs[0]} --output=" in out[0]
    assert not os.path.exists(os.path.join(runs[0], "plots"))


class _FigureTask(LMTask):
    """The LM task with figures of its own: a good one and two that cannot be saved."""

    def figures(self, workdir):
        lr = plot.figure([workdir], ["lr"])
        return {"lr": lr, "../escape": lr, "curves": lr}


def test_a_figure_that_cannot_be_drawn_costs_one_line_and_nothing_else(tmp_path, capsys):
    workdir = _write_run(tmp_path / "run", [{"step": 1, "split": "train", "compile_time": 1}])
    assert plot_hook.write_figures(workdir, _FigureTask(None)) == []
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2  # the curves and the task's figure: nothing is logged yet
    assert "no plot written" in out[0] and "nothing to draw" in out[0]
    assert f"draw it with: python -m jtrain.plot {workdir} --output=" in out[0]
    assert "task's figures were not drawn (nothing to draw" in out[1]


def test_task_figures_need_names_of_their_own(runs, capsys):
    plots = os.path.join(runs[0], "plots")
    written = plot_hook.write_figures(runs[0], _FigureTask(None))
    assert written == [os.path.join(plots, "curves.png"), os.path.join(plots, "lr.png")]
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "'../escape' is not a file name" in out[0] and "'curves'" in out[1]
    assert sorted(os.listdir(plots)) == ["curves.png", "lr.png"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    """A 6-step tiny run, validated every 3 steps, with a task that adds a figure."""
    workdir = str(tmp_path_factory.mktemp("tiny"))
    config = tiny_config(train__steps=6, train__log_every=2, eval__every_steps=3)
    run.train_and_evaluate(config, workdir, task=_FigureTask(config))
    return workdir


def test_a_training_run_leaves_its_curves_in_plots(tiny_run):
    path = os.path.join(tiny_run, "plots", "curves.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    width, height = Image.open(path).size
    assert 800 <= width <= 2000 and 300 <= height <= 1000
    # What the figure draws is what metrics.jsonl holds.
    events = read_metrics(tiny_run)
    lines = _lines(plot.figure([tiny_run]))
    name = os.path.basename(tiny_run)
    for metric in ("loss", "accuracy"):
        for split in ("train", "val", "test"):
            logged = {e["step"]: e[metric] for e in events if e["split"] == split and metric in e}
            assert lines[metric, f"{name} {split}"] == (list(logged), list(logged.values()))
    assert lines["loss", f"{name} train"][0] == [2, 4, 6]
    assert lines["loss", f"{name} val"][0] == [3, 6]


def test_a_tasks_figures_are_saved_next_to_the_curves(tiny_run):
    assert sorted(os.listdir(os.path.join(tiny_run, "plots"))) == ["curves.png", "lr.png"]
    assert not os.path.exists(os.path.join(tiny_run, "escape.png"))
    with open(os.path.join(tiny_run, "plots", "lr.png"), "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
