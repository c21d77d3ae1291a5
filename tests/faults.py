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


# Checkpoint integrity.


def strip_checksums(workdir, step: int) -> None:
    """Rewrites checkpoint `step`'s metadata without its checksums, as jtrain wrote it before
    it had them."""
    import json

    path = os.path.join(step_dir(workdir, step), "_CHECKPOINT_METADATA")
    with open(path) as f:
        metadata = json.load(f)
    del metadata["custom_metadata"]["checksums"]
    with open(path, "w") as f:
        json.dump(metadata, f)


def failing_writes(monkeypatch, error_number: int) -> None:
    """Makes every small file Orbax writes while saving (a step's metadata, its commit marker)
    fail with OSError(error_number), as a full disk or a lost mount does mid-save."""
    from orbax.checkpoint._src.path import async_path

    async def write_text(path, text):
        raise OSError(error_number, os.strerror(error_number), str(path))

    monkeypatch.setattr(async_path, "write_text", write_text)


def one_error_line(proc) -> str:
    """The one `error:` line of a command that failed without a traceback."""
    assert proc.returncode != 0, f"expected a failure:\n{proc.stdout[-2000:]}"
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, f"expected one error: line:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def run_module(module: str, *flags, timeout=120, devices=2):
    """Runs `python -m MODULE FLAGS` (jtrain.export, jtrain.generate, ...) to completion."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", module, *flags],
        cwd=conftest.REPO,
        env=conftest.main_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fault_mid_run(workdir, *flags, ready, fault, timeout=180, devices=2):
    """Starts the CLI, waits until ready() holds, applies fault() and lets the run go on;
    returns the finished process (stdout, stderr as text). A run still alive `timeout`
    seconds after the fault (hung) is killed and fails the test."""
    import subprocess
    import time

    proc = conftest.start_main(workdir, *flags, devices=devices)
    while not ready():
        assert proc.poll() is None, f"the run ended before the fault:\n{proc.stderr.read()[-3000:]}"
        time.sleep(0.05)
    fault()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the run still ran {timeout} s after the fault: it hangs") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


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


# The workdir guard.


def hold_workdir(workdir):
    """Starts a process that holds workdir's lock as a running jtrain run does, until it is
    killed; returns it once it holds the lock."""
    import subprocess
    import sys

    code = (
        "import sys, time\nfrom jtrain import workdir_lock\n"
        "workdir_lock.acquire(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(3600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir)],
        cwd=conftest.REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held", "the holder could not take the lock"
    return proc


def kill_hard(proc) -> None:
    """SIGKILL: the process gets no chance to clean up (a crash, the OOM killer)."""
    import signal

    proc.send_signal(signal.SIGKILL)
    proc.wait()


def unwritable(path):
    """A context in which the directory `path` cannot be written, even by root (chmod, and
    chattr +i where chmod is not enough); skips the test where neither works."""
    import contextlib

    return contextlib.contextmanager(_unwritable)(path)


def _unwritable(path):
    import stat

    import pytest

    mode = os.stat(path).st_mode
    os.chmod(path, stat.S_IRUSR | stat.S_IXUSR)
    immutable = os.geteuid() == 0 and _chattr(path, "+i")
    try:
        if _writable(path):
            pytest.skip("cannot make a directory unwritable here (root without chattr)")
        yield
    finally:
        if immutable:
            _chattr(path, "-i")
        os.chmod(path, mode)


def _chattr(path, flag: str) -> bool:
    import subprocess

    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except FileNotFoundError:  # no chattr
        return False


def _writable(directory) -> bool:
    probe = os.path.join(str(directory), ".probe")
    try:
        with open(probe, "w"):
            pass
    except OSError:
        return False
    os.remove(probe)
    return True


def disk_full_in_json_dump(monkeypatch) -> None:
    """Makes json.dump write the start of its output and then fail with ENOSPC, as a write
    to a full disk does."""
    import errno
    import json

    def dump(content, f, **kwargs):
        f.write(json.dumps(content, **kwargs)[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(json, "dump", dump)
