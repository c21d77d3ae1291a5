"""The progress display: the time-left arithmetic, the bar's frames, the console lines around
it, and what a run prints on a terminal (a bar) and to a pipe (the time left, no control
characters)."""

import re
import subprocess
import types

import pytest

from jtrain import console, progress
from jtrain.metrics import read_metrics
from tests.conftest import REPO, main_command, main_env
from tests.terminal import run_in_pty, screen


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def no_live_display(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # the bar's width, wherever the tests run
    yield
    console.close()  # a test that fails midway leaves no display for the next


def test_duration_is_short_and_readable():
    assert [progress.duration(s) for s in (0, 0.4, 45, 133, 3599.6, 3725)] == [
        "0s",
        "0s",
        "45s",
        "2m13s",
        "1h00m",
        "1h02m",
    ]


def test_rate_leaves_compilation_and_evaluation_pauses_out():
    clock = Clock()
    rate = progress.StepRate(clock)
    clock.now += 40  # compiling: before the first step finishes, never measured
    for step in range(1, 11):
        rate.tick(step)
        clock.now += 0.5
    clock.now += 30  # an evaluation after step 10
    for step in range(11, 21):
        rate.tick(step)
        clock.now += 0.5
    assert rate.seconds_per_step() == pytest.approx(0.5)
    assert rate.time_left(20, 100) == pytest.approx(40.0)
    assert rate.time_left(100, 100) == 0


def test_rate_of_a_resumed_run_starts_at_its_first_step():
    clock = Clock()
    rate = progress.StepRate(clock)
    rate.tick(50)  # the first step this process ran, after resuming at 49
    assert rate.seconds_per_step() is None and rate.time_left(50, 60) is None
    clock.now += 2.0
    rate.tick(51)
    assert rate.time_left(51, 60) == pytest.approx(18.0)


def test_rate_of_two_gaps_trusts_the_step_over_the_pause():
    clock = Clock()
    rate = progress.StepRate(clock)
    for step, gap in ((1, 0.1), (2, 5.0), (3, 0.0)):
        rate.tick(step)
        clock.now += gap
    assert rate.seconds_per_step() == pytest.approx(0.1)


def _started(mode: str, last: int = 100, first: int = 40):
    clock = Clock()
    shown = progress.Progress(last, mode=mode, clock=clock)
    loop = types.SimpleNamespace(started=clock.now - 5, end_step=first, stop_reason=None)
    shown.on_start(loop, None, first)
    for step in range(first + 1, first + 6):
        clock.now += 0.25
        shown.on_step(loop, step, {})
    return shown, loop, clock


def test_bar_frame_fits_the_terminal_and_says_how_the_run_ended(capsys):
    shown, loop, _ = _started("bar")
    frame = shown.frame(80)
    assert len(frame) <= 79 and frame.startswith(" 45/100 [")
    assert frame.endswith("45% | 4.0 steps/s | 6s elapsed | eta 14s")
    narrow = shown.frame(40)
    assert len(narrow) == 39 and "[" not in narrow  # no room for the bar itself
    loop.end_step = 45
    shown.on_end(loop, None, preempted=True)
    out = capsys.readouterr().out
    assert out.endswith("| preempted\n")  # the last frame stays, on a line of its own
    assert "\x1b[K" in out and "\r" in out


def test_log_mode_adds_the_time_left_to_train_lines_only():
    shown, _, _ = _started("log")
    assert shown.frame(80) is None
    assert shown.annotate(45, "train", "step 45 | train | loss 1") == (
        "step 45 | train | loss 1 | eta 14s"
    )
    assert shown.annotate(45, "val", "step 45 | val | loss 1") == "step 45 | val | loss 1"
    assert shown.annotate(100, "train", "step 100 | train") == "step 100 | train"


def test_mode_by_variable_else_by_terminal(monkeypatch):
    tty = types.SimpleNamespace(isatty=lambda: True)
    pipe = types.SimpleNamespace(isatty=lambda: False)
    monkeypatch.delenv(progress.VARIABLE, raising=False)
    assert (progress.chosen_mode(tty), progress.chosen_mode(pipe)) == ("bar", "log")
    for mode in progress.MODES:
        monkeypatch.setenv(progress.VARIABLE, mode.upper())
        assert progress.chosen_mode(tty) == progress.chosen_mode(pipe) == mode
    monkeypatch.setenv(progress.VARIABLE, "fancy")
    with pytest.raises(progress.ProgressSettingError, match="'fancy' is invalid: allowed: bar"):
        progress.chosen_mode(tty)


def test_status_lines_come_from_process_0_only(monkeypatch, capsys):
    monkeypatch.setattr(console.jax, "process_index", lambda: 1)
    console.status("jtrain: resumed from somewhere")
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(console.jax, "process_index", lambda: 0)
    console.status("jtrain: resumed from somewhere")
    assert capsys.readouterr().out == "jtrain: resumed from somewhere\n"


def test_lines_clear_the_bar_and_draw_it_again_below(capsys):
    shown, _, _ = _started("bar")
    capsys.readouterr()
    console.metric(45, "train", "step 45 | train | loss 1")
    console.status("jtrain: a note")
    out = capsys.readouterr().out
    frame = shown.frame(80)
    assert out == (
        f"\r\x1b[Kstep 45 | train | loss 1\n\r\x1b[K{frame}\r\x1b[Kjtrain: a note\n\r\x1b[K{frame}"
    )
    console.close()
    console.status("jtrain: after the run")
    assert capsys.readouterr().out == "\njtrain: after the run\n"


def test_a_signal_handler_line_takes_the_place_of_the_bar(capfd):
    shown, _, _ = _started("bar")
    frame = shown.frame(80)
    console.erase_from_signal_handler()  # then the handler writes its line, at the margin
    console.erase_from_signal_handler()  # nothing more: the line is erased already
    console.status("jtrain: preempted")  # no erasing either: the bar is not on screen
    console.close()
    out = capfd.readouterr().out
    assert out.endswith(f"{frame}\r\x1b[Kjtrain: preempted\n\r\x1b[K{frame}\n")


# One run on a terminal and one to a pipe, the same otherwise.
_FLAGS = (
    "--config=configs/tiny.py",
    "--config.train.steps=8",
    "--config.train.log_every=2",
    "--config.eval.every_steps=4",
    "--config.eval.sample_tokens=0",
)
_COLUMNS = 400  # no metric line wraps: each is one row of the screen
_METRIC_LINE = re.compile(r"step +\d+ \| (train|val|test) \| \w+ [^|]+( \| \w+ [^|]+)*")


@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tty")
    env = {k: v for k, v in main_env().items() if k != progress.VARIABLE}
    with open(workdir / "stderr.txt", "w") as err:
        run = run_in_pty(
            main_command(workdir / "run", *_FLAGS), env=env, cwd=REPO, columns=_COLUMNS, stderr=err
        )
    assert run.returncode == 0, (workdir / "stderr.txt").read_text()[-3000:]
    return workdir / "run", run.output


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipe") / "run"
    env = {k: v for k, v in main_env().items() if k != progress.VARIABLE}
    command = main_command(workdir, *_FLAGS)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout


def test_terminal_run_redraws_a_bar_below_intact_metric_lines(terminal_run):
    _, output = terminal_run
    assert output.count("\r\x1b[K") > 5  # the bar is redrawn in place
    rows = [row for row in screen(output, _COLUMNS) if row]
    metric_rows = [row for row in rows if row.startswith("step ")]
    assert len(metric_rows) >= 8  # compile time, 4 train, 2 val, test, wall time
    assert all(_METRIC_LINE.fullmatch(row) for row in metric_rows), metric_rows
    assert not any("eta" in row for row in metric_rows)  # the bar says it, not the lines
    bars = [row for row in rows if "elapsed" in row]
    assert len(bars) == 1 and re.fullmatch(r"8/8 \[[█#]+\] 100% \| .* \| done", bars[0])
    # The bar ends before the end-of-run lines (metric lines, then status lines such as the
    # drift profile's).
    after = [r for r in rows[rows.index(bars[0]) + 1 :] if r.startswith("step ")]
    assert [r.split(" | ")[1] for r in after] == ["test", "train"] and "wall_time" in after[-1]


def test_piped_run_has_no_control_characters_and_the_time_left(piped_run):
    _, stdout = piped_run
    assert "\r" not in stdout and "\x1b" not in stdout
    train = [line for line in stdout.splitlines() if " | train | loss " in line]
    assert [line.split()[1] for line in train] == ["2", "4", "6", "8"]
    assert all(re.search(r" \| eta \d+s$", line) for line in train[:-1]), train
    assert " eta " not in train[-1]  # nothing is left after the last step


def test_metrics_files_do_not_depend_on_the_display(terminal_run, piped_run):
    def keys(workdir):
        return [(e["step"], e["split"], sorted(e)) for e in read_metrics(str(workdir))]

    assert keys(terminal_run[0]) == keys(piped_run[0])
