"""The workdir guard under faults (issue 11, items 2, 3, 4, 7, 10 and 13, and the resume rules):
whose checkpoints a workdir holds, one run at a time, only jtrain's files, usable paths."""

import errno
import json
import os
import shutil
import socket
import subprocess

import pytest

from jtrain import config as config_lib
from jtrain import run, workdir_claim, workdir_guard, workdir_lock
from jtrain.checkpoint import CheckpointError
from jtrain.workdir_lock import WorkdirError
from tests import conftest, faults
from tests.conftest import REPO, tiny_config

SHORT = dict(train__steps=2, eval__every_steps=0, checkpoint__every_steps=0)


def config(**overrides):
    """The finished run's config, with overrides."""
    return tiny_config(**{**SHORT, **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step tiny run, checkpointed at step 2."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    run.train_and_evaluate(config(), workdir)
    return workdir


@pytest.fixture
def workdir(finished, tmp_path):
    """A copy of the finished run, for a test to damage or resume."""
    copy = str(tmp_path / "run")
    shutil.copytree(finished, copy)
    return copy


def steps(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def read_json(path):
    with open(path) as f:
        return json.load(f)


# Item 2: overwrite replaces another run's checkpoints, never the run's own.


def test_overwrite_keeps_the_runs_own_checkpoints(workdir, capsys):
    with workdir_claim.claimed(workdir, config(checkpoint__overwrite=True, train__steps=4)):
        pass
    assert steps(workdir) == [2]
    assert "this run's own" in capsys.readouterr().out


def test_a_different_config_refuses_the_workdir_unless_overwrite(workdir):
    with pytest.raises(CheckpointError, match=r"model.d_ff: 128 -> 256"):
        run.train_and_evaluate(config(model__d_ff=256), workdir)
    assert steps(workdir) == [2]  # nothing was deleted
    with workdir_claim.claimed(workdir, config(model__d_ff=256, checkpoint__overwrite=True)):
        # That run's checkpoints go, and its metrics and records, which would mix with these.
        assert os.listdir(workdir) == ["jtrain.lock"]


# Item 3: falsy values are compared like any other.


@pytest.mark.parametrize("saved, current", [(1, 0), (0, 1)])
def test_a_falsy_setting_is_compared_like_any_other(saved, current):
    assert workdir_guard.config_differences({"seed": saved}, {"seed": current}) == [
        f"seed: {saved} -> {current}"
    ]


def test_a_run_with_seed_1_is_not_resumed_with_seed_0(workdir):
    saved = read_json(os.path.join(workdir, "config.json"))
    config_lib.save_json({**saved, "seed": 1}, workdir)  # as a run with --config.seed=1 left it
    with pytest.raises(CheckpointError, match=r"seed: 1 -> 0"):
        run.train_and_evaluate(config(), workdir)
    with pytest.raises(CheckpointError, match=r"seed: 1 -> 2"):
        run.train_and_evaluate(config(seed=2), workdir)


def test_keys_added_to_jtrain_after_a_run_do_not_refuse_its_workdir():
    saved = {"seed": 0, "model": {"d_ff": 128}, "optimizer": {"name": "adamw"}}
    current = {"seed": 0, "model": {"d_ff": 128, "lora": {"rank": 0}, "norm": "rms"}}
    current["optimizer"] = {"name": "adamw"}
    assert workdir_guard.config_differences(saved, current) == []
    current["model"]["d_ff"] = 256
    assert workdir_guard.config_differences(saved, current) == ["model.d_ff: 128 -> 256"]


# Item 4: one run at a time per workdir.


def test_a_second_run_is_refused_while_the_first_holds_the_workdir(workdir):
    holder = faults.hold_workdir(workdir)
    try:
        who = rf"pid {holder.pid} on host {socket.gethostname()} since "
        with pytest.raises(WorkdirError, match=f"in use by another run \\({who}"):
            run.train_and_evaluate(config(), workdir)
        with pytest.raises(WorkdirError, match=who):  # --mode=eval writes metrics.jsonl too
            run.evaluate(config(), workdir)
    finally:
        faults.kill_hard(holder)
    # The kernel dropped the killed holder's lock: nothing stale blocks the restart.
    with workdir_claim.claimed(workdir, config()):
        pass


def test_the_cli_names_the_run_holding_the_workdir(workdir):
    holder = faults.hold_workdir(workdir)
    try:
        line = faults.run_failing(workdir, *faults.ARGS)
    finally:
        faults.kill_hard(holder)
    assert f"is in use by another run (pid {holder.pid} on host" in line


@pytest.mark.parametrize("call", [run.train_and_evaluate, run.evaluate])
def test_the_workdir_is_released_when_a_run_raises(workdir, monkeypatch, call):
    def fail(*args, **kwargs):
        raise RuntimeError("failed mid-run")

    monkeypatch.setattr(run.Experiment, "from_config", fail)
    with pytest.raises(RuntimeError, match="failed mid-run"):
        call(config(), workdir)
    workdir_lock.acquire(workdir).release()  # would raise if the run still held it


def test_every_process_of_a_run_hears_that_the_workdir_is_held(tmp_path):
    holder = faults.hold_workdir(tmp_path)
    port = _free_port()
    try:
        procs = [
            subprocess.Popen(
                conftest.main_command(tmp_path, *faults.ARGS)
                + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
                + [f"--process_id={index}"],
                cwd=REPO,
                env=conftest.main_env(1),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for index in (0, 1)
        ]
        lines = [faults.one_error_line(_finished(proc)) for proc in procs]
    finally:
        faults.kill_hard(holder)
    assert f"in use by another run (pid {holder.pid}" in lines[0]
    assert "process 0 of the run could not use" in lines[1]


def test_a_filesystem_without_locks_gets_a_warning_not_an_error(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
    workdir_lock.acquire(str(tmp_path)).release()
    assert "has no file locks" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finished(proc, timeout=120) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# Item 7: a directory of someone else's files is not a workdir.


def test_a_hugging_face_model_directory_is_refused(tmp_path):
    model = tmp_path / "hf_model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "architectures": ["Llama"]}')
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    before = (model / "config.json").read_bytes()
    with pytest.raises(WorkdirError, match=r"config.json, model.safetensors\).*init_from=hf:"):
        run.train_and_evaluate(config(), str(model))
    with pytest.raises(WorkdirError, match="jtrain did not write"):
        run.evaluate(config(), str(model))
    assert (model / "config.json").read_bytes() == before


def test_a_folder_of_data_is_refused_and_an_empty_one_is_not(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(WorkdirError, match=r"\(train.jsonl\)"):
        with workdir_claim.claimed(str(tmp_path / "data"), config()):
            pass
    (tmp_path / "empty").mkdir()
    with workdir_claim.claimed(str(tmp_path / "empty"), config()):
        pass


def test_everything_a_run_writes_is_a_name_the_guard_knows(finished):
    assert set(os.listdir(finished)) <= workdir_claim.OWN_NAMES
    assert workdir_claim.foreign_entries(finished) == []


# Item 13: URLs are refused before anything is written.


def test_a_url_workdir_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkdirError, match=r"gs://bucket/run is a URL.*gcsfuse"):
        run.train_and_evaluate(config(), "gs://bucket/run")
    assert os.listdir(tmp_path) == []  # no local ./gs:/bucket/run


# Item 10 (part): config.json is written whole or not at all.


def test_a_full_disk_leaves_no_half_written_config_json(tmp_path, monkeypatch):
    faults.disk_full_in_json_dump(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        run.train_and_evaluate(config(), str(tmp_path))  # a fresh start
    assert "config.json" not in os.listdir(tmp_path)
    monkeypatch.undo()
    config_lib.save_json(config(), str(tmp_path))
    before = (tmp_path / "config.json").read_bytes()
    faults.disk_full_in_json_dump(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        config_lib.save_json(config(seed=3), str(tmp_path))
    assert (tmp_path / "config.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "jtrain.lock"]  # no temporary left


# The resume rules: refuse what changes the checkpoints' meaning, record what changes results.


def _every_config_key() -> set[str]:
    from jtrain.models import cnn, lora, mlp, transformer, vit
    from jtrain.tasks import classify, dpo, grpo, regress, reward, supervised

    keys = set()
    for name in sorted(n for n in os.listdir(os.path.join(REPO, "configs")) if n.endswith(".py")):
        with open(os.path.join(REPO, "configs", name)) as f:
            recipe = "def get_config(" in f.read()  # supervised.py is a base, not a recipe
        if recipe:
            keys |= set(workdir_guard.flatten(conftest.load_config(name).to_dict()))
    families = (transformer.TransformerConfig, mlp.MLPConfig, cnn.CNNConfig, vit.ViTConfig)
    keys |= {f"model.{name}" for family in families for name in family.__dataclass_fields__}
    keys |= {f"model.lora.{name}" for name in lora.LoRAConfig.__dataclass_fields__}
    empty = tiny_config()
    sections = {"classify": classify, "regress": regress, "reward": reward, "dpo": dpo}
    sections |= {"grpo": grpo}
    for section, module in sections.items():
        keys |= {f"{section}.{key}" for key in module.settings(empty)}
    keys |= {f"augment.{key}" for key in supervised.augment_settings(empty)}
    return keys


def test_every_config_key_has_a_resume_rule():
    keys = _every_config_key()
    assert {"seed", "train.seq_len", "grpo.beta", "augment.flip", "model.patch_size"} <= keys
    unruled = sorted(k for k in keys if workdir_guard.group_of(k) is workdir_guard.UNKNOWN)
    assert not unruled, f"add these keys to workdir_guard.GROUPS: {unruled}"


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("train.seq_len", 64, workdir_guard.REFUSE),  # would reinterpret the data position
        ("train.batch_size", 32, workdir_guard.REFUSE),
        ("data.source", "python_stdlib", workdir_guard.REFUSE),
        ("optimizer.name", "lion", workdir_guard.REFUSE),
        ("optimizer.lr", 1e-4, workdir_guard.RECORD),
        ("schedule.name", "wsd", workdir_guard.RECORD),
        ("train.steps", 40, workdir_guard.RECORD),
        ("model.dropout", 0.1, workdir_guard.RECORD),
        ("data.prefetch", 0, workdir_guard.FREE),
        ("model.remat", "full", workdir_guard.FREE),
        ("mesh.data", 2, workdir_guard.FREE),
        ("mesh.rules.embed", "", workdir_guard.FREE),
        ("eval.every_steps", 5, workdir_guard.FREE),
        ("checkpoint.every_steps", 1, workdir_guard.FREE),
    ],
)
def test_each_change_on_resume_is_refused_recorded_or_free(key, value, rule):
    saved = tiny_config().to_dict()
    changed = config(**{key.replace(".", "__"): value})
    [change] = [c for c in workdir_guard.changes(saved, changed.to_dict()) if c.key == key]
    assert change.group.rule == rule


def test_a_results_changing_resume_is_recorded_and_a_free_one_is_accepted(workdir, capsys):
    changed = config(train__steps=3, optimizer__lr=1e-3, model__remat="full", data__prefetch=0)
    run.train_and_evaluate(changed, workdir)
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out
    assert "resuming with changed settings" in out and "optimizer.lr: 0.003 -> 0.001" in out
    with open(os.path.join(workdir, workdir_claim.CHANGES)) as f:
        [record] = [json.loads(line) for line in f]
    assert record["step"] == 2
    assert record["changes"] == {"optimizer.lr": [3e-3, 1e-3], "train.steps": [2, 3]}
    assert read_json(os.path.join(workdir, "config.json"))["optimizer"]["lr"] == 1e-3


def test_a_seq_len_change_on_resume_is_refused(workdir):
    with pytest.raises(CheckpointError, match=r"train.seq_len: 32 -> 64 \(.*point elsewhere"):
        run.train_and_evaluate(config(train__seq_len=64), workdir)


# A missing or damaged config.json is restored from the checkpoints' metadata.


@pytest.mark.parametrize("damage", ["missing", "empty", "not json"])
def test_a_lost_config_json_is_restored_from_the_checkpoints(workdir, damage):
    path = os.path.join(workdir, "config.json")
    original = read_json(path)
    os.remove(path)
    if damage != "missing":
        with open(path, "w") as f:
            f.write("" if damage == "empty" else "{'seed': 0")
    with pytest.raises(CheckpointError, match=r"model.d_ff: 128 -> 256"):
        run.train_and_evaluate(config(model__d_ff=256), workdir)
    assert read_json(path) == original
    with workdir_claim.claimed(workdir, config()):  # the same run resumes
        pass


def test_checkpoints_nobody_can_name_are_refused_unless_overwrite(workdir):
    os.remove(os.path.join(workdir, "config.json"))
    os.remove(os.path.join(faults.step_dir(workdir, 2), "_CHECKPOINT_METADATA"))
    with pytest.raises(CheckpointError, match="cannot tell whose they are"):
        with workdir_claim.claimed(workdir, config()):
            pass
    with workdir_claim.claimed(workdir, config(checkpoint__overwrite=True)):
        assert sorted(os.listdir(workdir)) == ["jtrain.lock"]


# Paths that cannot be a workdir end in one error line.


def test_unusable_paths_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(WorkdirError, match="--workdir is empty"):
        run.train_and_evaluate(config(), "")
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="is a file, not a directory"):
        run.train_and_evaluate(config(), str(tmp_path / "file"))
    (tmp_path / "ro").mkdir()
    with faults.unwritable(tmp_path / "ro"):
        with pytest.raises(WorkdirError, match=r"cannot use --workdir=.*ro: .*permission"):
            run.train_and_evaluate(config(), str(tmp_path / "ro"))


def test_an_empty_workdir_flag_is_one_error_line():
    line = faults.run_failing("", *faults.ARGS)
    assert line.startswith("error: --workdir is empty")
