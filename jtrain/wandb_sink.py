"""Weights & Biases: every event of a training run also logged to a W&B run, with the resolved
config as its config (`metrics.wandb_project`; "" = off, and then wandb is never imported).

Only process 0 logs. The W&B run's id is kept in workdir/wandb_run.json, so a run resumed from
its checkpoints continues the same W&B run (`wandb.init(id=..., resume="allow")`); a run that
starts at step 0 starts a new one. Its local files go to workdir/wandb/.

Each event is logged as `split/metric` (`train/loss`, `val/perplexity`) together with `step`,
which `define_metric` makes the x-axis of every metric: W&B's own step only grows, and would
drop what comes behind it (the steps a resumed run trains again after a kill; the test split
of an early-stopped run, logged at its best step).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

import jax
import ml_collections

from jtrain import atomic, extras
from jtrain.errors import UserError

RUN_FILE = "wandb_run.json"  # {"id", "project", "entity"} of the W&B run this workdir logs to
LOCAL_DIR = "wandb"  # wandb's own files, under the workdir
STEP = "step"


def check(config: ml_collections.ConfigDict) -> None:
    """Raises MissingExtraError (one line: the pip command) when metrics.wandb_project is set
    and wandb is not installed; imports nothing when it is not set."""
    if config.metrics.wandb_project:
        _import_wandb(config)


def sinks(config: ml_collections.ConfigDict, workdir: str, first_step: int) -> list[WandbSink]:
    """The W&B sink of a training run that starts after `first_step` (0: a new run), or none:
    W&B off, or not process 0."""
    if not config.metrics.wandb_project or jax.process_index() != 0:
        return []
    return [WandbSink(config, workdir, resume=first_step > 0)]


def _import_wandb(config: ml_collections.ConfigDict):
    use = f"metrics.wandb_project={config.metrics.wandb_project!r} (Weights & Biases)"
    return extras.need("wandb", extra="wandb", use=use)


class WandbSink:
    """A `metrics.Sink` that logs each event to one W&B run and finishes it on close."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, resume: bool):
        wandb = _import_wandb(config)
        m = config.metrics
        path = os.path.join(workdir, RUN_FILE)
        run_id = _saved_id(path) if resume else None
        try:
            self.run = wandb.init(
                project=m.wandb_project,
                entity=m.wandb_entity or None,
                name=os.path.basename(os.path.abspath(workdir)),
                config=config.to_dict(),
                dir=workdir,
                # Resuming: the same W&B run, whose config may take the values a resume
                # changes (optimizer.lr, train.steps; config_changes.jsonl lists them).
                **({"id": run_id, "resume": "allow", "allow_val_change": True} if run_id else {}),
            )
        except Exception as err:  # not logged in, offline, no such entity: wandb says which
            why = " ".join(str(err).split())  # one line
            raise UserError(
                f"Weights & Biases could not start a run for metrics.wandb_project="
                f"{m.wandb_project!r}: {type(err).__name__}: {why} (run `wandb login`, set "
                'WANDB_MODE=offline, or set --config.metrics.wandb_project="" to log without it)'
            ) from err
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)
        record = {"id": self.run.id, "project": m.wandb_project, "entity": m.wandb_entity}
        atomic.write_json(path, record)

    def write(self, step: int, split: str, values: Mapping[str, float | int]) -> None:
        self.run.log({STEP: step, **{f"{split}/{name}": v for name, v in values.items()}})

    def close(self) -> None:
        # Closed by MetricWriter.__exit__: an exception on its way out is the run failing.
        self.run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)


def _saved_id(path: str) -> str | None:
    """The W&B run id the workdir logged to, or None (no file, or not readable)."""
    try:
        with open(path, encoding="utf-8") as f:
            return str(json.load(f)["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
