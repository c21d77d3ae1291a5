"""Training objectives. `get(config)` builds the Task that `config.task` names."""

from __future__ import annotations

from jtrain.models.transformer import TransformerConfig
from jtrain.tasks.base import LossOutput, Task
from jtrain.tasks.lm import LMTask

# "sft" is the LM loss too: its batches' mask is 1 on response tokens only (jtrain.data.sft).
TASKS = ("lm", "sft")

__all__ = ["TASKS", "LMTask", "LossOutput", "Task", "get"]


def get(config) -> Task:
    """The Task for `config.task`, built from `config.model`."""
    if config.task in ("lm", "sft"):
        return LMTask(TransformerConfig.from_mapping(config.model))
    raise ValueError(f"task={config.task!r} is not known; allowed: {', '.join(TASKS)}.")
