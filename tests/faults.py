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
