"""Signals and shutdown (issue 11): Ctrl-C saves and exits like SIGTERM, a second Ctrl-C quits
at once keeping the checkpoints, repeated SIGTERMs still end in status 0, data workers die
with their trainer, and closing the metric writer cannot hang."""

import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time

from tensorboardX import record_writer

from jtrain import metrics
from tests import conftest, faults

# One Grain worker process: Ctrl-C reaches it too, and it must outlive neither its trainer
# nor the step the trainer saves. Steps enough that the run cannot finish by itself: with a
# warm compile cache the tiny run's 60 steps took less time than the test needed to see step
# 3 and send the Ctrl-C (a fresh-clone CI run saw it exit 0 with no notice).
FLAGS = (*faults.ARGS, "--config.data.workers=1", "--config.train.steps=1000000")
NOTICE = "jtrain: SIGINT received"


def _committed_steps(workdir) -> set[str]:
    return {name for name in os.listdir(workdir / "checkpoints") if name.isdigit()}


def _gone_soon(pids, seconds=5.0) -> bool:
    deadline = time.time() + seconds
    while any(faults.running(pid) for pid in pids):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_ctrl_c_saves_and_exits_0_and_a_second_ctrl_c_quits_at_once(tmp_path):
    workdir = tmp_path / "run"
    # 1. One Ctrl-C, then SIGTERMs until the run ends: a scheduler repeating its notice
    # through the save, the metric writer's close and the interpreter's exit.
    with faults.terminal_job(workdir, *FLAGS) as proc:
        faults.wait_for_step(workdir, 3, proc)
        faults.ctrl_c(proc)
        # The Ctrl-C first: a SIGTERM sent microseconds after it may reach another thread and
        # be noticed first (the run then stops for the SIGTERM, just as well).
        stderr = lambda: faults.job_output(workdir)[1]  # noqa: E731
        faults.wait_until(lambda: NOTICE in stderr(), proc, "the Ctrl-C notice")
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
    out, err = faults.job_output(workdir)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.count(NOTICE) == 1, err[-3000:]
    saved = re.search(r"preempted; saved step (\d+)", out).group(1)
    checkpoints = os.listdir(workdir / "checkpoints")
    assert saved in checkpoints and not [n for n in checkpoints if "tmp" in n], checkpoints

    # 2. Resumed, then Ctrl-C twice: the second ends the process at once by SIGINT (status
    # 130 in a shell), without saving, and runs no code in the trainer (as a SIGKILL would):
    # its data worker must go by itself.
    with faults.terminal_job(workdir, *FLAGS) as proc:
        faults.wait_for_step(workdir, int(saved) + 3, proc)
        workers = faults.child_pids(proc.pid)
        before = _committed_steps(workdir)
        faults.ctrl_c(proc)
        faults.wait_until(lambda: NOTICE in stderr(), proc, "the Ctrl-C notice")
        faults.ctrl_c(proc)
        assert proc.wait(timeout=10) == -signal.SIGINT
    out, err = faults.job_output(workdir)
    assert f"at step {saved}" in out and "preempted" not in out, out[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert before <= _committed_steps(workdir)
    assert workers and _gone_soon(workers), [faults.running(pid) for pid in workers]


# The pipeline alone, as the trainer builds it: two workers, then SIGKILL.
_PIPELINE = """
import time
from jtrain.data import pipeline
from tests.conftest import tiny_config
iterator = pipeline.make_train_iterator(tiny_config(data__workers=2))
next(iterator)
print("ready", flush=True)
time.sleep(600)
"""


def test_data_workers_die_with_a_sigkilled_trainer():
    proc = subprocess.Popen(
        [sys.executable, "-c", _PIPELINE],
        cwd=conftest.REPO,
        env=conftest.main_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        children = faults.child_pids(proc.pid)  # the 2 workers (and multiprocessing's tracker)
        assert len(children) >= 2
        proc.kill()
        proc.wait()
        assert _gone_soon(children), [faults.running(pid) for pid in children]
    finally:
        proc.kill()
        proc.wait()


def test_a_failing_event_write_neither_hangs_nor_loses_the_jsonl(tmp_path, monkeypatch):
    # tensorboardX's SummaryWriter wrote in a background thread: a failed write killed that
    # thread, and the 11th event (its queue holds 10) and close() then waited forever.
    def no_space(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer = metrics.MetricWriter(str(tmp_path), log_to_stdout=False)
    monkeypatch.setattr(record_writer.RecordWriter, "write", no_space)  # the disk fills up
    errors = []

    def log_and_close():
        for step in range(1, 13):
            try:
                writer.write(step, "train", {"loss": 1.0 / step})
            except OSError as err:  # reported where it happens, after the JSONL line
                errors.append(err.errno)
        writer.close()

    thread = threading.Thread(target=log_and_close, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "MetricWriter.write or close hangs after a failed write"
    assert errors == [errno.ENOSPC] * 12
    losses = {e["step"]: e["loss"] for e in metrics.read_metrics(str(tmp_path))}
    assert losses == {step: 1.0 / step for step in range(1, 13)}
