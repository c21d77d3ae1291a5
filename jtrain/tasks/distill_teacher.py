"""The teacher of a distillation run: the model it is, built from its own saved architecture,
and the checks that it can teach this student.

`distill.teacher` names a jtrain workdir (its config.json gives the teacher's `model.*` keys,
its checkpoints the weights) or `hf:PATH` (a Hugging Face directory: its config.json gives the
architecture). The teacher's config is the student's with the teacher's `model.*` keys, so the
student's task (the same one the student trains with) builds the teacher too: any size and
layout the family can express. The run's own compute choices (dtype, attention kernel) apply
to both. What the teacher must share with the student is checked per inner task: the
vocabulary of a language model, the classes and input preprocessing of a classifier.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import ml_collections

from jtrain import models, pretrained, tasks
from jtrain.tasks.base import FrozenModel, Task
from jtrain.validation import ConfigError

# This run's choices for how a model computes, not part of the teacher's architecture.
_RUN_FIELDS = ("dtype", "attention", "remat", "loss_chunk")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The teacher's spec, its config and the task (of the student's kind) that builds it."""

    spec: str
    config: ml_collections.ConfigDict
    task: Task

    def frozen_model(self) -> FrozenModel:
        """Built from the teacher's architecture, loaded from its spec, never checkpointed."""
        return FrozenModel(make=self.task.make_model, init_from=self.spec)

    def forward_flops_per_example(self) -> float:
        """A forward pass: a third of a training step's FLOPs (forward + 2x backward)."""
        return self.task.flops_per_example(weight_grads=True) / 3.0


def build(config, inner: str, spec: str) -> Teacher:
    """The teacher `spec` names for a student of task `inner`; ConfigError when it cannot be
    read or cannot teach that student (the checks of `compatible`)."""
    prefix = f"config.distill.teacher={spec!r}"
    problem = pretrained.check(spec)
    if problem:
        raise ConfigError(f"{prefix} is invalid: {problem}.")
    reads = tasks.task_class(inner).model_reads
    if pretrained.is_hf(spec) and reads != "tokens":
        raise ConfigError(
            f"{prefix} is invalid: an hf: teacher is a Hugging Face language model, and a "
            f"task={inner} student reads {reads}; name the workdir of a jtrain run."
        )
    teacher_config = (
        _hf_config(config, spec) if pretrained.is_hf(spec) else _run_config(config, spec)
    )
    family = models.family_of(teacher_config.model)
    if family.reads != reads:
        raise ConfigError(
            f"{prefix} is a model.kind={teacher_config.model.get('kind', 'transformer')} model, "
            f"which reads {family.reads}; a task={inner} student reads {reads}: name a teacher "
            "trained on the same kind of data."
        )
    try:
        family.validate(teacher_config)
    except ConfigError as err:
        raise ConfigError(f"{prefix}: the teacher's {err}") from None
    task = tasks.task_class(inner)(teacher_config)
    if not pretrained.is_hf(spec):
        task.load_artifacts(_saved_artifacts(spec, task))
    return Teacher(spec, teacher_config, task)


def _run_config(config, spec: str) -> ml_collections.ConfigDict:
    """The student's config with the `model.*` keys and tokenizer of the run in `spec`."""
    path = os.path.join(os.path.expanduser(spec), "config.json")
    if not os.path.isfile(path):  # a checkpoints/ directory: its run's config is one up
        path = os.path.join(os.path.dirname(os.path.abspath(spec)), "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        model = dict(saved["model"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"config.distill.teacher={spec!r} is invalid: its run's config ({path}) is unreadable "
            f"({err}); name the workdir of a finished jtrain run."
        ) from None
    rank = dict(model.get("lora") or {}).get("rank", 0)
    if rank:
        raise ConfigError(
            f"config.distill.teacher={spec!r} is invalid: it is a LoRA run (model.lora.rank="
            f"{rank}) whose checkpoints hold adapters only; export it merged with "
            f"`python -m jtrain.export --workdir={spec} --to_hf=DIR` and name hf:DIR."
        )
    out = ml_collections.ConfigDict(config.to_dict())
    model.update({k: config.model[k] for k in _RUN_FIELDS if k in config.model})
    model.pop("lora", None)  # a frozen model is built without adapters
    out.model = ml_collections.ConfigDict(model)
    out.data.tokenizer = saved.get("data", {}).get("tokenizer", "byte")
    return _without_init(out)


def _hf_config(config, spec: str) -> ml_collections.ConfigDict:
    """The student's config with the architecture (and tokenizer) of the hf: directory."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.model.init_from = spec
    out.data.tokenizer = "byte"  # apply_architecture names the directory's own, when it has one
    try:
        pretrained.apply_architecture(out)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config.distill.teacher={spec!r}: {err}") from None
    if out.data.tokenizer == "byte":
        out.data.tokenizer = config.data.tokenizer  # no tokenizer files: the student's applies
    return _without_init(out)


def _without_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.model.init_from = ""  # the weights come through FrozenModel.init_from
    return config


def _saved_artifacts(spec: str, task: Task) -> dict[str, dict]:
    """The files the teacher's run saved for its task (a classifier's preprocessing.json)."""
    files = {}
    for name in task.artifacts_names():
        path = os.path.join(os.path.expanduser(spec), name)
        if os.path.isfile(path):
            with open(path) as f:
                files[name] = json.load(f)
    return files


# What a teacher must share with its student, by the student's task: the registry of the
# tasks a student may be distilled with (`distill.task`).
Check = Callable[[Task, Teacher], None]
_CHECKS: dict[str, Check] = {}


def register_check(*names: str):
    """Decorator: `check(student_task, teacher)` raises ConfigError when the teacher cannot
    teach a student of these tasks."""

    def add(check: Check) -> Check:
        _CHECKS.update(dict.fromkeys(names, check))
        return check

    return add


def distillable() -> tuple[str, ...]:
    """The tasks a student may train with under distillation."""
    return tuple(_CHECKS)


def compatible(student: Task, teacher: Teacher, inner: str) -> None:
    """Raises ConfigError when the teacher cannot teach this student."""
    _CHECKS[inner](student, teacher)


@register_check("lm", "sft")
def _same_vocabulary(student: Task, teacher: Teacher) -> None:
    """KL compares the two next-token distributions id by id: the ids must mean the same."""
    s, t = student.config, teacher.config
    prefix = f"config.distill.teacher={teacher.spec!r}"
    if t.data.tokenizer != s.data.tokenizer:
        raise ConfigError(
            f"{prefix} is invalid: the teacher's tokenizer is {t.data.tokenizer!r} and the "
            f"student's data.tokenizer is {s.data.tokenizer!r}; distillation compares their "
            f"next-token distributions id by id: set --config.data.tokenizer={t.data.tokenizer}."
        )
    if t.model.vocab_size != s.model.vocab_size:
        raise ConfigError(
            f"{prefix} is invalid: the teacher's vocabulary has {t.model.vocab_size} ids "
            f"(model.vocab_size) and the student's {s.model.vocab_size}; set "
            f"--config.model.vocab_size={t.model.vocab_size}."
        )


@register_check("classify")
def _same_classes(student: Task, teacher: Teacher) -> None:
    """KL compares class distributions class by class, on inputs the teacher reads as its own."""
    s, t = student.preprocessor, teacher.task.preprocessor
    prefix = f"config.distill.teacher={teacher.spec!r}"
    if s.classes != t.classes:
        raise ConfigError(
            f"{prefix} is invalid: the teacher has {len(t.classes)} classes "
            f"({', '.join(t.classes)}) and the student's data {len(s.classes)} "
            f"({', '.join(s.classes)}); distill on data with the teacher's classes."
        )
    if s.to_json() != t.to_json():
        raise ConfigError(
            f"{prefix} is invalid: the teacher's preprocessing.json differs from the "
            f"preprocessing fitted on the student's data.source={student.config.data.source!r} "
            "(features, normalisation or image size), so the teacher would read other inputs; "
            "distill on the data, data.features and model.image_size the teacher was trained with."
        )
