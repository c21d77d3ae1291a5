"""Knowledge distillation: a student learns from a frozen teacher's softened distributions as
well as from the labels.

Keys (`config.distill.*`; a config without the block takes these defaults):
  teacher: ""          a jtrain workdir or hf:PATH (required); its own config.json gives its
                       architecture, so the student (`model.*`) may be of any size
  task: "lm"           the student's own task: lm | sft (per token) | classify (per example);
                       its examples, model, metrics and display are the student's
  alpha: 0.5           the weight of the KL term; 1 - alpha weighs the task's own loss
  temperature: 2.0     T: both distributions are softmax(logits / T)
  kl: "forward"        forward: KL(teacher_T || student_T); reverse: KL(student_T || teacher_T)

The loss is alpha * T^2 * KL + (1 - alpha) * (the task's loss on the labels), summed over real
positions only (target tokens of a language model, examples of a classifier) and reported per
loss weight; `kl` (at temperature T) and `ce` (the task's own loss, so `ce` compares with a
run without a teacher) are reported beside it, and with them every metric of the student's
task (`perplexity` and `accuracy` of `ce`'s predictions). The teacher is a frozen model
(`Task.frozen_models`): loaded from its spec when the run starts, never checkpointed, loaded
again on resume, and pinned in WORKDIR/frozen_sources.json like a DPO reference.
"""

from __future__ import annotations

import jax

from jtrain import tasks
from jtrain.tasks import distill_losses, distill_teacher
from jtrain.tasks.base import Batch, LossOutput, Task, section
from jtrain.validation import ConfigError, one_of, require

TEACHER = "teacher"  # the frozen model's name in TrainState.frozen
_PARTS = ("kl", "ce")  # the sums distillation adds to the student task's
_DEFAULTS = {"teacher": "", "task": "lm", "alpha": 0.5, "temperature": 2.0, "kl": "forward"}


def settings(config) -> dict:
    return section(config, "distill", _DEFAULTS)


@tasks.register("distill")
class DistillTask(Task):
    """The student's task (`distill.task`) with a teacher's KL added to its loss; everything
    else (examples, model, metrics, display) is the student task's."""

    name = "distill"

    def __init__(self, config):
        super().__init__(config)
        s = settings(config)
        self.alpha, self.temperature, self.kl = float(s["alpha"]), float(s["temperature"]), s["kl"]
        self.inner = tasks.task_class(_inner_name(config))(config)
        self.splittable_examples = self.inner.splittable_examples
        self.model_reads = self.inner.model_reads
        self.selection_metric = self.inner.selection_metric
        self._teacher: distill_teacher.Teacher | None = None

    @classmethod
    def trains(cls, config) -> type[Task]:
        return tasks.task_class(_inner_name(config))

    @classmethod
    def validate(cls, config) -> None:
        s = settings(config)
        if not s["teacher"]:
            raise ConfigError(
                "config.distill.teacher='' is invalid: name the teacher, a jtrain workdir or "
                "hf:PATH, with --config.distill.teacher."
            )
        require(0 <= s["alpha"] <= 1, "distill.alpha", s["alpha"], "must be in [0, 1]")
        require(s["temperature"] > 0, "distill.temperature", s["temperature"], "must be > 0")
        one_of("distill.kl", s["kl"], distill_losses.KL_DIRECTIONS)
        chunk = config.model.get("loss_chunk", 0)
        require(
            not chunk,
            "model.loss_chunk",
            chunk,
            "must be 0 with task=distill, whose loss compares the teacher's and the student's "
            "whole logits",
        )
        tasks.task_class(_inner_name(config)).validate(config)
        _ = cls(config).teacher  # reads the teacher's config: fails here, before compiling

    @property
    def teacher(self) -> distill_teacher.Teacher:
        """The teacher, built (not loaded) once, after checking it can teach this student."""
        if self._teacher is None:
            inner = settings(self.config)["task"]
            teacher = distill_teacher.build(self.config, inner, settings(self.config)["teacher"])
            distill_teacher.compatible(self.inner, teacher, inner)
            self._teacher = teacher
        return self._teacher

    # The student's task, unchanged.

    def source_specs(self, source: str):
        return self.inner.source_specs(source)

    def examples(self, spec, split: str):
        return self.inner.examples(spec, split)

    def artifacts(self, exp, previous):
        return self.inner.artifacts(exp, previous)

    def artifacts_names(self):
        return self.inner.artifacts_names()

    def load_artifacts(self, files) -> None:
        self.inner.load_artifacts(files)

    def make_model(self, rngs):
        return self.inner.make_model(rngs)

    def report_outputs(self, outputs):
        return self.inner.report_outputs(outputs)

    def save_outputs(self, outputs, stem: str) -> None:
        self.inner.save_outputs(outputs, stem)

    def tokens_per_example(self) -> int:
        return self.inner.tokens_per_example()

    def batch_shapes(self):
        return self.inner.batch_shapes()

    def batch_source(self, exp, workdir: str):
        return self.inner.batch_source(exp, workdir)

    def evaluate(self, exp, state, split: str):
        return self.inner.evaluate(exp, state, split)

    def generation_set(self, split: str, limit: int):
        return self.inner.generation_set(split, limit)

    def show(self, model) -> None:
        self.inner.show(model)

    def figures(self, workdir: str):
        return self.inner.figures(workdir)

    # What distillation adds.

    def frozen_models(self):
        return {TEACHER: self.teacher.frozen_model()}

    def flops_per_example(self, *, weight_grads: bool = True) -> float:
        student = self.inner.flops_per_example(weight_grads=weight_grads)
        return student + self.teacher.forward_flops_per_example()

    def loss(self, model, batch: Batch, *, dropout_rng=None, frozen=None) -> LossOutput:
        student = _Recorded(model)
        hard = self.inner.loss(student, batch, dropout_rng=dropout_rng, frozen=frozen)
        args, kwargs, student_logits = student.call()
        # The teacher reads exactly what the student read (mixed images included), no dropout.
        teacher_logits = frozen[TEACHER](*args, **{**kwargs, "dropout_rng": None})
        kl = distill_losses.kl_per_position(
            jax.lax.stop_gradient(teacher_logits), student_logits, self.temperature, self.kl
        )
        kl_sum = distill_losses.masked_sum(kl, batch["loss_weight"])
        loss_sum = distill_losses.combined(kl_sum, hard.loss_sum, self.alpha, self.temperature)
        sums = {**hard.sums, "kl": kl_sum, "ce": hard.loss_sum}
        return LossOutput(loss_sum, hard.weight, sums, hard.outputs)

    def report(self, totals: LossOutput) -> dict[str, float]:
        """The student task's metrics of its own loss (`ce`), with `loss` the distillation
        loss and `kl` the KL at temperature T, both per loss weight."""
        own = {k: v for k, v in totals.sums.items() if k not in _PARTS}
        metrics = self.inner.report(LossOutput(totals.sums["ce"], totals.weight, own))
        weight = float(totals.weight)
        per_weight = (lambda x: float(x) / weight) if weight > 0 else (lambda x: 0.0)
        metrics["ce"] = metrics["loss"]
        metrics["loss"] = per_weight(totals.loss_sum)
        metrics["kl"] = per_weight(totals.sums["kl"])
        return metrics


def _inner_name(config) -> str:
    name = settings(config)["task"]
    one_of("distill.task", name, distill_teacher.distillable())
    return name


class _Recorded:
    """The student as the inner task's loss calls it, keeping the call: the teacher reads the
    same inputs, and the KL the same student logits, with no second student forward pass."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)
        self.calls.append((args, kwargs, logits))
        return logits

    def call(self) -> tuple[tuple, dict, jax.Array]:
        if len(self.calls) != 1:  # a task whose loss is not one forward pass of the model
            raise TypeError(
                f"distillation needs a task whose loss calls the model once, not "
                f"{len(self.calls)} times"
            )
        return self.calls[0]
