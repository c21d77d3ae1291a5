"""Fault injection: the ways a hostile environment damages a run, as small reusable primitives.

Each `tests/test_faults_*.py` module takes its faults from here, so a new fault is one new
primitive and one test. Primitives damage files the way disks, kills and users do (truncate,
flip bits, delete, replace a directory by a file) and run the CLI expecting it to fail with
one `error:` line.
"""

from __future__ import annotations

import os
import random

from tests import conftest

# The shorthand: a tiny 60-step run that logs every step and saves every 10.
ARGS = (
    "--config=configs/tiny.py",
    "--config.train.steps=60",
    "--config.train.log_every=1",
    "--config.checkpoint.every_steps=10",
    "--config.eval.every_steps=0",
    "--config.eval.sample_tokens=0",
)


def step_dir(workdir, step: int) -> str:
    """The directory of checkpoint `step` in a workdir."""
    return os.path.join(str(workdir), "checkpoints", str(step))


def files_under(directory) -> list[str]:
    """Every regular file under `directory`, largest first (the data files lead)."""
    found = []
    for root, _, names in os.walk(str(directory)):
        found += [os.path.join(root, name) for name in names]
    return sorted(found, key=lambda path: (-os.path.getsize(path), path))


def data_files(workdir, step: int) -> list[str]:
    """The array data files of a checkpoint (TensorStore's chunk files), largest first."""
    state = os.path.join(step_dir(workdir, step), "state")
    return [p for p in files_under(state) if "/d/" in p or os.path.basename(p).startswith("ocdbt")]


def truncate(path, fraction: float = 0.5) -> None:
    """Cuts a file to `fraction` of its size (a write the disk never finished)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


def flip_bits(path, count: int = 8, *, seed: int = 0) -> list[int]:
    """Flips one bit in each of `count` random bytes of a file (silent media corruption);
    returns the offsets."""
    rng = random.Random(seed)
    size = os.path.getsize(path)
    offsets = sorted(rng.sample(range(size), min(count, size)))
    with open(path, "r+b") as f:
        for offset in offsets:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    return offsets


def replace_with_file(path) -> None:
    """Puts a regular file where a directory (or nothing) was: every write under it fails."""
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path)
    with open(path, "w") as f:
        f.write("not a directory\n")


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines a failed command printed."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def run_failing(workdir, *flags, timeout=300, devices=2):
    """Runs the CLI expecting it to fail with exactly one `error:` line and no traceback;
    returns that line."""
    proc = conftest.run_main(workdir, *flags, timeout=timeout, devices=devices)
    assert proc.returncode != 0, f"expected a failure:\n{proc.stdout[-2000:]}"
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, f"expected one error: line:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# Bad data and evaluation splits.


def failing_evaluation(monkeypatch, split: str = "val") -> None:
    """Makes every evaluation of `split` raise a DataError, as data that breaks after the run
    checked it would (a file replaced, a disk gone)."""
    from jtrain import hooks
    from jtrain.errors import DataError

    real = hooks.evaluate_split

    def evaluate_split(exp, state, name, **kwargs):
        if name == split:
            raise DataError(f"injected fault: the {split} split cannot be read")
        return real(exp, state, name, **kwargs)

    monkeypatch.setattr(hooks, "evaluate_split", evaluate_split)


def write_lines(path, lines) -> str:
    """Writes `lines` (str, encoded as UTF-8, or raw bytes: invalid UTF-8, broken JSON) one a
    line; returns the path."""
    with open(path, "wb") as f:
        for line in lines:
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def corrupt_gzip(path, text: bytes) -> str:
    """Writes `text` gzipped with its deflate stream damaged in the middle (zlib.error when
    read past the first part); returns the path."""
    import gzip

    data = bytearray(gzip.compress(text))
    middle = len(data) // 2
    for i in range(middle, min(middle + 64, len(data) - 8)):
        data[i] ^= 0x55
    with open(path, "wb") as f:
        f.write(bytes(data))
    return str(path)


# Signals and shutdown.


class terminal_job:  # noqa: N801 - used as a function: `with terminal_job(...) as proc`
    """Runs the CLI as a terminal's foreground job: in its own process group (which `ctrl_c`
    signals, as a terminal does), stdout and stderr in files (`job_output`) so that no pipe
    fills while a test waits. The group is killed on leaving, should the test fail early."""

    def __init__(self, workdir, *flags, devices=2):
        self.command = conftest.main_command(workdir, *flags)
        self.workdir, self.devices = workdir, devices

    def __enter__(self):
        import subprocess

        with open(f"{self.workdir}.out", "w") as out, open(f"{self.workdir}.err", "w") as err:
            self.proc = subprocess.Popen(
                self.command,
                cwd=conftest.REPO,
                env=conftest.main_env(self.devices),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        return self.proc

    def __exit__(self, *exc) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def job_output(workdir) -> tuple[str, str]:
    """The stdout and stderr a `terminal_job` in workdir has written so far."""
    with open(f"{workdir}.out") as out, open(f"{workdir}.err") as err:
        return out.read(), err.read()


def ctrl_c(proc) -> None:
    """SIGINT to the process group, as Ctrl-C in a terminal (data workers included)."""
    import signal

    os.killpg(proc.pid, signal.SIGINT)


def wait_until(condition, proc, what: str, timeout=120) -> None:
    """Polls condition() until it holds; fails if the process ends first or time runs out."""
    import time

    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def wait_for_step(workdir, step: int, proc, timeout=120) -> None:
    """Waits until metrics.jsonl has logged train step `step` (or a later one)."""

    def logged() -> bool:
        path = os.path.join(str(workdir), "metrics.jsonl")
        return os.path.exists(path) and max(conftest.train_losses(workdir), default=0) >= step

    wait_until(logged, proc, f"step {step}", timeout)


def child_pids(pid: int) -> list[int]:
    """The running processes whose parent is `pid` (Linux /proc)."""
    return [child for child in _proc_pids() if (_stat(child) or ("", 0))[1] == pid]


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _proc_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name, in (), may hold spaces
    except OSError:
        return None
    return fields[0], int(fields[1])
