"""Which columns a task's data and model give a drift profile, by registration: a profiler
per task name (`register`), found with `get`, never by branching on the task.

A profiler makes a `profile.Sample` of the train split (`reference`, for the profile) and of
new data named by a source spec (`current`, for the report), with the same columns.
"""

from __future__ import annotations

from typing import Protocol

from jtrain.drift.profile import ProfileError, Sample


class Profiler(Protocol):
    def reference(self, task, model) -> Sample:
        """The train split's columns, and the model's outputs on them."""

    def current(self, task, model, source: str, meta: dict) -> Sample:
        """The columns of the new data `source` names, and the model's outputs on them;
        `meta` is what the reference sample kept (`Sample.meta`), e.g. its token list."""


_PROFILERS: dict[str, Profiler] = {}


def register(*names: str):
    """Class decorator: an instance of the class profiles the runs of these tasks."""

    def add(cls):
        for name in names:
            _PROFILERS[name] = cls()
        return cls

    return add


def get(task_name: str) -> Profiler:
    """The profiler of `task_name`; ProfileError listing the tasks that have one."""
    _load_builtin()
    if task_name not in _PROFILERS:
        raise ProfileError(
            f"drift monitoring does not cover task={task_name!r} runs; it covers "
            f"{', '.join(sorted(_PROFILERS))}"
        )
    return _PROFILERS[task_name]


def has(task_name: str) -> bool:
    _load_builtin()
    return task_name in _PROFILERS


def _load_builtin() -> None:
    from jtrain.drift import supervised_profiler, text_profiler  # noqa: F401  (they register)
