"""Training objectives, registered by name: `config.task` picks one.

`task=NAME` names a registered Task (`lm`, `sft`, `dpo`, `reward`, `grpo`, `classify`,
`regress`, `distill`);
`task=module.path:ClassName` loads a user's own Task subclass from their code. A new objective
is a new module that subclasses `jtrain.tasks.base.Task` and decorates it with
`register("name")`.
"""

from __future__ import annotations

from jtrain import user_code
from jtrain.tasks.base import FrozenModel, LossOutput, Task
from jtrain.validation import ConfigError

__all__ = ["FrozenModel", "LossOutput", "Task", "get", "names", "register", "task_class"]

_TASKS: dict[str, type[Task]] = {}


def register(name: str):
    """Class decorator: makes a Task subclass available as `task=name`."""

    def add(cls: type[Task]) -> type[Task]:
        _TASKS[name] = cls
        return cls

    return add


def names() -> tuple[str, ...]:
    """The registered task names."""
    _load_builtin()
    return tuple(sorted(_TASKS))


def task_class(name: str) -> type[Task]:
    """The Task class `config.task` names: registered, or `module.path:ClassName`."""
    _load_builtin()
    if name in _TASKS:
        return _TASKS[name]
    if isinstance(name, str) and ":" in name:
        return _user_task(name)
    raise ConfigError(
        f"config.task={name!r} is invalid: allowed: {', '.join(names())}, or "
        "module.path:ClassName for a Task subclass of your own."
    )


def get(config) -> Task:
    """The Task for `config.task`, built from the whole config."""
    return task_class(config.task)(config)


def _user_task(spec: str) -> type[Task]:
    module_name = spec.partition(":")[0]
    try:
        module_name, class_name, cls = user_code.attribute(spec)
    except ImportError as err:
        raise ConfigError(
            f"config.task={spec!r} is invalid: cannot import {module_name!r} ({err}); "
            "run from the directory that holds it or put it on PYTHONPATH."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(
            f"config.task={spec!r} is invalid: {module_name} has no Task subclass named "
            f"{class_name!r}; subclass jtrain.tasks.Task."
        )
    return cls


def _load_builtin() -> None:
    from jtrain.tasks import classify, distill, dpo, grpo, lm, regress, reward, sft  # noqa: F401
