"""Multi-process runs on one machine, as on several hosts: processes joined through
jax.distributed on 127.0.0.1 train exactly like one process with the same devices, and a
SIGTERM to any one of them makes every process save the same step and exit cleanly (JAX's
preemption sync point), after which the run resumes there.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from jtrain.metrics import read_metrics
from tests.conftest import REPO, main_command, main_env, train_losses

FLAGS = [
    "--config=configs/tiny.py",
    "--config.train.log_every=1",
    "--config.eval.every_steps=0",
    "--config.eval.sample_tokens=0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, devices: int, *flags, process: tuple[int, int] | None = None):
    env = main_env(devices)
    cmd = main_command(workdir, *FLAGS, *flags)
    if process is not None:
        port, pid = process
        cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
        cmd += [f"--process_id={pid}"]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _start_pair(workdir, *flags):
    port = _free_port()
    return [_start(workdir, 2, *flags, process=(port, pid)) for pid in (0, 1)]


def _finish(procs, timeout=240) -> list[str]:
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path):
    steps = "--config.train.steps=6"
    _finish([_start(tmp_path / "one", 4, steps)])
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
    env.update(PYTHON=sys.executable, JTRAIN_PORT=str(_free_port()))
    launched = subprocess.run(
        ["bash", "launch/local.sh", "2", f"--workdir={tmp_path / 'two'}", *FLAGS, steps],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    # Same global mesh and batch; only the cross-process all-reduce (Gloo) may sum in
    # another order, which moves float32 results by a few ulps at most.
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    val = lambda d: [e for e in read_metrics(str(d)) if e["split"] == "val"][-1]["loss"]  # noqa: E731
    assert val(tmp_path / "two") == pytest.approx(val(tmp_path / "one"), rel=1e-5)


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    flags = ["--config.train.steps=400", "--config.checkpoint.every_steps=100"]
    procs = _start_pair(tmp_path, *flags)
    deadline = time.time() + 180
    while not (tmp_path / "metrics.jsonl").exists() or max(train_losses(tmp_path), default=0) < 8:
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no step 8"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # a scheduler preempting one host
    outs = _finish(procs)  # both exit 0: each took part in the same step's save
    saved = re.search(r"preempted; saved step (\d+)", outs[0])
    assert saved, outs[0]
    step = int(saved.group(1))
    assert 8 <= step < 400
    assert str(step) in os.listdir(tmp_path / "checkpoints")
    # Status lines come from process 0 only: process 1 says nothing about the run.
    assert "jtrain:" not in outs[1], outs[1]
    # Both processes resume from that step (train.steps may grow on resume).
    outs = _finish(_start_pair(tmp_path, f"--config.train.steps={step + 2}"))
    assert f"resumed from {tmp_path / 'checkpoints'} at step {step}" in outs[0], outs[0]
    assert max(train_losses(tmp_path)) == step + 2
