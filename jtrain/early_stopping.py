"""Early stopping: end a run whose validation metric has stopped improving, on its best weights.

`train.early_stopping.metric` names a validation metric (`loss`, `accuracy`, `roc_auc`, ...),
`mode` whether lower (`min`) or higher (`max`) is better, `patience` how many evaluations
without an improvement larger than `min_delta` to allow. Checkpoints are saved at every
evaluation and the best one is kept; when the run stops (or reaches train.steps) its final
weights are the best evaluation's, so the test split is evaluated on those. The decision is
recorded in WORKDIR/early_stopping.json; a stopped run started again stays stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from jtrain import atomic, checkpoint, console, metrics
from jtrain.hooks import Evaluate, Hook
from jtrain.state import TrainState
from jtrain.validation import ConfigError, one_of, require

RECORD = "early_stopping.json"
MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class Settings:
    metric: str
    mode: str
    patience: int
    min_delta: float

    @classmethod
    def from_config(cls, config) -> Settings | None:
        """The settings of `train.early_stopping`, or None when it is off (metric "")."""
        block = config.train.get("early_stopping")
        if block is None or not block.metric:
            return None
        return cls(block.metric, block.mode, block.patience, float(block.min_delta))

    def better(self, value: float, than: float, *, margin: float = 0.0) -> bool:
        """Whether `value` beats `than` by more than `margin`."""
        return value < than - margin if self.mode == "min" else value > than + margin


def validate(config) -> None:
    block = config.train.get("early_stopping")
    if block is None or not block.metric:
        return
    one_of("train.early_stopping.mode", block.mode, MODES)
    patience = block.patience
    ok = isinstance(patience, int) and not isinstance(patience, bool) and patience >= 1
    require(ok, "train.early_stopping.patience", patience, "must be an integer >= 1 (evaluations)")
    min_delta = block.min_delta
    require(min_delta >= 0, "train.early_stopping.min_delta", min_delta, "must be >= 0")


class EarlyStopping(Hook):
    """Watches the validation hook's results; stops the run and restores the best weights."""

    def __init__(self, settings: Settings, val: Evaluate, ckpts: checkpoint.Checkpoints):
        self.settings, self.val, self.ckpts = settings, val, ckpts
        self.history: dict[int, float] = {}  # step -> monitored value

    def on_start(self, loop, state, step) -> None:
        # A resumed run counts the evaluations it made before: they are in metrics.jsonl.
        for event in metrics.read_metrics(loop.workdir, missing_ok=True):
            if event["split"] == self.val.split and event["step"] <= step:
                if self.settings.metric in event:
                    self.history[event["step"]] = event[self.settings.metric]
        record = read_record(loop.workdir)
        if record and record.get("stopped") and record.get("stopped_at") == step:
            console.status(
                f"jtrain: this run stopped early at step {step} ({record['reason']}); "
                "nothing left to train"
            )
            loop.stop(record["reason"])

    def due(self, step, *, last, preempted) -> bool:
        return self.val.due(step, last=last, preempted=preempted)

    def run(self, loop, step, state) -> None:
        if self.val.ran_at != step:
            return
        results = loop.results[self.val.split]
        name = self.settings.metric
        if name not in results:
            raise ConfigError(
                f"config.train.early_stopping.metric={name!r} is invalid: the {self.val.split} "
                f"events have no such metric; allowed: {', '.join(sorted(results))}."
            )
        self.history[step] = float(results[name])
        waited = self._evaluations_without_improvement()
        if waited >= self.settings.patience and step < loop.config.train.steps:
            loop.stop(
                f"{self.val.split} {name} has not improved by more than "
                f"{self.settings.min_delta} ({self.settings.mode}) for {waited} evaluations"
            )

    def _evaluations_without_improvement(self) -> int:
        best, waited = None, 0
        for step in sorted(self.history):
            value = self.history[step]
            if best is None or self.settings.better(value, best, margin=self.settings.min_delta):
                best, waited = value, 0
            else:
                waited += 1
        return waited

    def best_step(self) -> int | None:
        """The kept checkpoint with the best monitored value (the earliest of equals)."""
        kept = [s for s in sorted(self.history) if s in set(self.ckpts.steps())]
        best = None
        for step in kept:
            if best is None or self.settings.better(self.history[step], self.history[best]):
                best = step
        return best

    def final_state(self, loop, state: TrainState) -> TrainState:
        self.ckpts.wait()
        best = self.best_step()
        if best is not None and best != loop.end_step:
            abstract = loop.exp.abstract_sharded_state().checkpointed()
            restored, _, _ = self.ckpts.restore_latest(abstract, step=best)
            state = restored.replace(frozen=state.frozen)
            console.status(f"jtrain: restored the best checkpoint, step {best}")
        loop.final_step = best if best is not None else loop.end_step
        if jax.process_index() == 0:
            self._write_record(loop, best)
        return state

    def _write_record(self, loop, best: int | None) -> None:
        s = self.settings
        record = {
            "stopped": loop.stop_reason is not None,
            "stopped_at": loop.end_step,
            "reason": loop.stop_reason or f"reached train.steps={loop.config.train.steps}",
            "metric": f"{self.val.split}/{s.metric}",
            "mode": s.mode,
            "patience": s.patience,
            "min_delta": s.min_delta,
            "best_step": best,
            "best_value": self.history.get(best) if best is not None else None,
            "history": {str(step): value for step, value in sorted(self.history.items())},
        }
        atomic.write_json(os.path.join(loop.workdir, RECORD), record, indent=2)


def read_record(workdir: str) -> dict | None:
    """The workdir's early-stopping record, or None."""
    path = os.path.join(workdir, RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def final_step(workdir: str) -> int | None:
    """The step of the weights a run ended with when early stopping chose them (its best
    evaluation), else None: the latest checkpoint is the run's final state."""
    record = read_record(workdir)
    return record.get("best_step") if record else None
