"""Holding a run's workdir: a usable path, one run at a time, and only jtrain's files in it.

`claimed(workdir, config)` is what a run does before it writes anything there:

- the path must be a local directory it can write (a URL such as gs://... is refused: jtrain
  has no remote filesystem support, and would write to a local "gs:" folder);
- it takes the workdir's lock (jtrain.workdir_lock), released when the run ends however it
  ends; in a multi-process run process 0 takes it and the others hear whether it could.
  Evaluation (--mode=eval) takes it too: it appends to metrics.jsonl and writes eval/ as
  training does, and its test-split-once check reads what a live run may be writing;
- the directory must be new, empty or jtrain's: a Hugging Face model directory or a folder
  of data is refused rather than written into (a run would replace its config.json);
- a training run then checks whose checkpoints the workdir holds (jtrain.workdir_guard's
  rules): another run's are refused unless `checkpoint.overwrite=True` replaces that run;
  this run's own are resumed, recording the results-changing settings that changed. A
  missing or damaged config.json is restored from the config saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jtrain import (
    atomic,
    checkpoint_faults,
    console,
    early_stopping,
    frozen_sources,
    tasks,
    wandb_sink,
    workdir_lock,
)
from jtrain import config as config_lib
from jtrain import workdir_guard as rules
from jtrain.checkpoint import URL, CheckpointError
from jtrain.tasks.base import Task
from jtrain.workdir_lock import WorkdirError

__all__ = ["CHANGES", "OWN_NAMES", "WorkdirError", "check_path", "claimed", "foreign_entries"]

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
CHANGES = "config_changes.jsonl"  # the RECORD changes each resume made
_DAMAGED = os.path.basename(checkpoint_faults.damaged_directory(CHECKPOINTS))
# What a run writes in its workdir (README, "Workdir layout"), besides its task's
# `artifacts_names()`: a workdir holding nothing else is jtrain's.
OWN_NAMES = frozenset(
    {
        CONFIG,
        "metrics.jsonl",
        "tensorboard",
        CHECKPOINTS,
        _DAMAGED,
        "eval",
        "plots",
        "rollouts",
        "drift",
        early_stopping.RECORD,
        frozen_sources.FILE,
        CHANGES,
        workdir_lock.FILE,
        wandb_sink.RUN_FILE,
        wandb_sink.LOCAL_DIR,
    }
)
# Kept when another run is replaced: the lock is this run's, and damaged checkpoints are
# evidence of the disk, not of that run.
_KEPT = frozenset({workdir_lock.FILE, _DAMAGED})
_TEMPORARY = re.compile(r"\.\d+\.tmp$")  # jtrain.atomic's, left by a killed write


@contextlib.contextmanager
def claimed(
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    task: Task | None = None,
    training: bool = True,
):
    """Holds `workdir` for one run (train, or with training=False evaluate) until the block
    ends; raises WorkdirError or CheckpointError for a workdir the run must not use."""
    check_path(workdir)
    names = (task or tasks.get(config)).artifacts_names()

    def claim() -> workdir_lock.Lock:
        lock = workdir_lock.acquire(workdir)
        try:
            _check_files(workdir, names)
            if training:
                _check_checkpoints(workdir, config.to_dict(), names)
        except BaseException:
            lock.release()
            raise
        return lock

    lock = _on_process_0(claim, workdir)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def check_path(workdir: str) -> None:
    """Refuses a workdir that cannot be a local directory (process 0 makes it: `acquire`)."""
    workdir = os.fspath(workdir) if workdir else ""
    if not workdir.strip():
        raise WorkdirError(
            "--workdir is empty: give the directory for the run's config, metrics and "
            "checkpoints (a new or empty one for a new run)"
        )
    if URL.match(workdir):
        raise WorkdirError(
            f"--workdir={workdir} is a URL, and jtrain writes to local paths only: use a local "
            "directory, or mount the bucket (e.g. with gcsfuse) and give the mounted path"
        )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file, not a directory: use another path")


def _on_process_0(claim: Callable[[], workdir_lock.Lock], workdir: str) -> workdir_lock.Lock | None:
    """claim() on process 0, which alone locks and inspects the workdir; every process waits
    for its outcome, and fails with it (process 0 prints why)."""
    if jax.process_count() == 1:
        return claim()
    lock, failed = None, True
    try:
        if jax.process_index() == 0:
            lock = claim()
        failed = False
    finally:  # reached whatever process 0 met, so no process waits for it forever
        outcome = multihost_utils.process_allgather(np.asarray(failed))
    if np.any(outcome):
        raise WorkdirError(f"process 0 of the run could not use --workdir={workdir}; it says why")
    return lock


# -- whose files -------------------------------------------------------------------------------


def foreign_entries(workdir: str, artifacts: tuple[str, ...] = ()) -> list[str]:
    """The entries of `workdir` jtrain did not write (none in a jtrain run's workdir)."""
    entries = sorted(os.listdir(workdir))
    kind = _config_kind(os.path.join(workdir, CONFIG)) if CONFIG in entries else None
    if kind == "jtrain":
        return []  # a run's workdir: files a user added to it are theirs to keep
    own = (OWN_NAMES - {CONFIG}) | set(artifacts) | ({CONFIG} if kind == "unreadable" else set())
    # Dot files are other tools' bookkeeping (.DS_Store, .nfs..., .ipynb_checkpoints), not
    # a model's or a dataset's content.
    return [n for n in entries if not n.startswith(".") and _TEMPORARY.sub("", n) not in own]


def _config_kind(path: str) -> str:
    """Whose config.json: "jtrain" (a run wrote it), "other" (another program's, such as a
    Hugging Face model's) or "unreadable" (damaged: a write cut short)."""
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, ValueError):
        return "unreadable"
    sections = ("model", "train", "checkpoint")
    ours = isinstance(content, dict) and all(isinstance(content.get(s), dict) for s in sections)
    return "jtrain" if ours else "other"


def _check_files(workdir: str, artifacts: tuple[str, ...]) -> None:
    foreign = foreign_entries(workdir, artifacts)
    if not foreign:
        return
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    hint = ""
    if CONFIG in foreign:  # another program's config.json, such as a Hugging Face model's
        hint = f" To start from the model there, pass --config.model.init_from=hf:{workdir}."
    raise WorkdirError(
        f"--workdir={workdir} holds files jtrain did not write ({shown}); a run would write its "
        f"config.json, metrics and checkpoints among them. Use a new or empty directory.{hint}"
    )


# -- whose checkpoints -------------------------------------------------------------------------


def _check_checkpoints(workdir: str, config: dict, artifacts: tuple[str, ...]) -> None:
    """Refuses, replaces (overwrite) or resumes the checkpoints the workdir holds."""
    directory = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(directory) or not os.listdir(directory):
        return  # nothing saved yet: nothing to protect
    saved = _saved_config(workdir)
    found = rules.changes(saved, config) if saved is not None else []
    refused = [c for c in found if c.group.rule == rules.REFUSE]
    if saved is None or refused:
        if not config["checkpoint"]["overwrite"]:
            raise CheckpointError(_refusal(workdir, refused))
        _replace_previous_run(workdir, artifacts)
        return
    if config["checkpoint"]["overwrite"]:
        console.status(
            "jtrain: checkpoint.overwrite=True, but the checkpoints in the workdir are this "
            "run's own (nothing that decides what they mean changed): resuming from them"
        )
    recorded = [c for c in found if c.group.rule == rules.RECORD]
    if recorded:
        _record(workdir, recorded)


def _refusal(workdir: str, refused: list[rules.Change]) -> str:
    if not refused:
        return (
            f"{os.path.join(workdir, CHECKPOINTS)} holds checkpoints, but {CONFIG} is missing "
            "or unreadable and no checkpoint's metadata holds the config, so jtrain cannot "
            "tell whose they are. Use another --workdir, or "
            "--config.checkpoint.overwrite=True to replace them."
        )
    return (
        f"{workdir} holds checkpoints of a different run; these settings differ:\n  "
        + "\n  ".join(f"{c} ({c.group.why})" for c in refused)
        + "\nResume with the original settings, use another --workdir, or pass "
        "--config.checkpoint.overwrite=True to replace that run (its checkpoints, metrics and "
        "records are deleted)."
    )


def _saved_config(workdir: str) -> dict | None:
    """The config of the run whose checkpoints workdir holds: its config.json, else the one
    saved with the newest checkpoint whose metadata reads (config.json is restored from it)."""
    path = os.path.join(workdir, CONFIG)
    if _config_kind(path) == "jtrain":
        with open(path) as f:
            return json.load(f)
    saved, step = _config_in_checkpoints(os.path.join(workdir, CHECKPOINTS))
    if saved is not None:
        config_lib.save_json(saved, workdir)
        console.status(
            f"jtrain: {path} was missing or unreadable: restored it from the config saved "
            f"with checkpoint {step}"
        )
    return saved


def _config_in_checkpoints(directory: str) -> tuple[dict | None, int | None]:
    """(config, step) from the newest checkpoint whose metadata holds one, else (None, None)."""
    options = ocp.CheckpointManagerOptions(read_only=True)
    manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                saved = (manager.metadata(step).custom_metadata or {}).get("config")
            except Exception:  # noqa: BLE001 - unreadable metadata: try an older checkpoint
                continue
            if isinstance(saved, Mapping) and saved:
                return dict(saved), step
    finally:
        manager.close()
    return None, None


def _replace_previous_run(workdir: str, artifacts: tuple[str, ...]) -> None:
    """Deletes what another run wrote here (checkpoint.overwrite=True): its checkpoints, and its
    metrics and records, which would otherwise mix with this run's."""
    replaced = (OWN_NAMES - _KEPT) | set(artifacts)
    gone = [n for n in sorted(os.listdir(workdir)) if _TEMPORARY.sub("", n) in replaced]
    for name in gone:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    console.status(
        f"jtrain: checkpoint.overwrite=True: deleted the previous run's {', '.join(gone)} "
        f"from {workdir}"
    )


def _record(workdir: str, recorded: list[rules.Change]) -> None:
    """Prints the results-changing settings this resume changed and appends them to
    WORKDIR/config_changes.jsonl, with the step they apply from (at most)."""
    steps = frozen_sources.committed_steps(os.path.join(workdir, CHECKPOINTS))
    entry = {
        "step": steps[-1] if steps else None,  # the newest checkpoint: where the run resumes
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "changes": {c.key: [c.old, c.new] for c in recorded},
    }
    path = os.path.join(workdir, CHANGES)
    try:
        with open(path) as f:
            before = f.read()
    except FileNotFoundError:
        before = ""

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(before + json.dumps(entry) + "\n")

    atomic.write(path, write)  # a full disk leaves the earlier records whole
    console.status(
        f"jtrain: resuming with changed settings (recorded in {path}): "
        + "; ".join(str(c) for c in recorded)
    )
