"""Pinning the weights a run's frozen parts were built from (a LoRA base, a DPO reference).

Frozen parts are never checkpointed: a resume, an export or an evaluation rebuilds them from
their specs. A spec names a place, not weights: a base run extended after this run started
would give its newest checkpoint, and the same adapters would then resume on, and export
with, another base. So the first start records what each spec held (`version`) in
WORKDIR/frozen_sources.json; every rebuild loads that same checkpoint step and refuses when
the weights there changed since.
"""

from __future__ import annotations

import json
import os

import jax

from jtrain import atomic, checkpoint, console, pretrained
from jtrain.checkpoint import CheckpointError

FILE = "frozen_sources.json"
# Files of a Hugging Face directory that hold the weights (tokenizers do not).
_WEIGHT_FILES = (".safetensors", ".safetensors.index.json")


def checkpoints_dir(spec: str) -> str:
    """The checkpoints/ directory a jtrain spec (a workdir or its checkpoints/) names."""
    return checkpoint.checkpoints_directory(os.path.abspath(os.path.expanduser(spec)))


def committed_steps(directory: str) -> list[int]:
    """The committed checkpoint steps of a checkpoints/ directory (unfinished saves have other
    names), oldest first."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def version(spec: str, step: int | None = None) -> dict:
    """What tells apart the weights a spec names, read without loading them.

    An hf: directory: its weight files' sizes and modification times. A Hub model: the commit
    its revision names (immutable on the Hub). A jtrain run: the checkpoint step (the newest,
    unless given) and the time Orbax committed it, which a rewritten checkpoint of the same
    step does not share.
    """
    if pretrained.is_hf(spec):
        snapshot = pretrained.hub_snapshot(spec)
        if snapshot is not None:
            return {"commit": snapshot.commit}
        path = pretrained.hf_path(spec)
        names = [n for n in os.listdir(path) if n == "config.json" or n.endswith(_WEIGHT_FILES)]
        return {n: _stamp(os.path.join(path, n)) for n in sorted(names)}
    directory = checkpoints_dir(spec)
    steps = committed_steps(directory)
    step = (steps[-1] if steps else None) if step is None else step
    if step is None or step not in steps:
        return {"step": step, "committed": None}
    return {"step": step, "committed": _commit_time(os.path.join(directory, str(step)))}


def _stamp(path: str) -> list[int]:
    status = os.stat(path)
    return [status.st_size, status.st_mtime_ns]


def _commit_time(step_dir: str) -> int | list[int]:
    """Orbax's commit timestamp of a checkpoint step (else the directory's stamp)."""
    try:
        with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
            return int(json.load(f)["commit_timestamp_nsecs"])
    except (OSError, ValueError, KeyError, TypeError):
        return _stamp(step_dir)


def pinned_specs(exp) -> dict[str, str]:
    """The frozen parts rebuilt from a spec, by name: those that hold weights and name one."""
    holding = {n for n, part in exp.abstract_state.frozen.items() if jax.tree.leaves(part)}
    return {n: spec for n, spec in exp.sources().items() if n in holding and spec}


def pin(exp, workdir: str, *, has_checkpoints: bool) -> None:
    """Records (a fresh start) or checks (a resume) the versions of the run's frozen sources,
    and makes `exp` load them at the recorded checkpoint steps."""
    specs = pinned_specs(exp)
    if not specs:
        return
    path = os.path.join(workdir, FILE)
    recorded = read(workdir)
    if recorded is None or not has_checkpoints:  # nothing trained on them yet: pin them now
        if recorded is None and has_checkpoints:
            console.status(
                f"jtrain: note: {workdir} was trained before frozen sources were pinned; "
                "pinning them as they are now (an earlier change cannot be detected)"
            )
        recorded = {name: {"spec": spec, "version": version(spec)} for name, spec in specs.items()}
        if jax.process_index() == 0:
            atomic.write_json(path, recorded)
    apply(exp, recorded, workdir)


def read(workdir: str) -> dict | None:
    """The pins a run recorded, or None (a run without frozen sources, or an older one)."""
    try:
        with open(os.path.join(workdir, FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{os.path.join(workdir, FILE)} is unreadable ({err}): it records which weights the "
            "run's frozen parts were built from. Restore it from a backup, or delete it to pin "
            "the weights the specs name now."
        ) from None


def apply(exp, recorded: dict, workdir: str) -> None:
    """Checks every pinned source still holds the recorded weights; sets `exp.source_steps`."""
    steps = {}
    for name, spec in pinned_specs(exp).items():
        pin_ = recorded.get(name)
        if pin_ is None or pin_["spec"] != spec:
            continue  # a spec the run did not record (or changed by the workdir guard's rules)
        problem = _changed(spec, pin_["version"])
        if problem:
            raise CheckpointError(
                f"{workdir} was trained on the frozen {name!r} weights of {spec}, but {problem}. "
                "Its checkpoints hold what was trained on those weights only: restore them, or "
                f"train anew in another --workdir (the pins: {os.path.join(workdir, FILE)})."
            )
        steps[name] = pin_["version"].get("step") if not pretrained.is_hf(spec) else None
    exp.source_steps = steps


def _changed(spec: str, pinned: dict) -> str | None:
    """What changed in the weights `spec` names since `pinned` was recorded, or None."""
    if pretrained.is_hf(spec):
        now = version(spec)
        if now != pinned and "commit" in now and "commit" in pinned:
            # The Hub keeps every commit: naming the pinned one brings those weights back.
            repo_id, revision = pretrained.hub_id(spec)
            return (
                f"its revision {revision!r} now names commit {now['commit']}, not "
                f"{pinned['commit']}; to go on with those weights, name that commit: "
                f"hf:{repo_id}@{pinned['commit']}"
            )
        if now != pinned:
            changed = sorted(n for n in now.keys() | pinned.keys() if now.get(n) != pinned.get(n))
            return f"its files changed since ({', '.join(changed)})"
        return None
    step = pinned.get("step")
    now = version(spec, step)
    if now["committed"] is None:
        steps = committed_steps(checkpoints_dir(spec))
        return f"its checkpoint of step {step} is gone (it has steps {steps or 'none'})"
    if now != pinned:
        return f"its checkpoint of step {step} was rewritten since"
    return None
