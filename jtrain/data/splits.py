"""The check, before a run trains, that every split it reads has examples.

A run trains on the train split, validates on val (every `eval.every_steps` and after the last
step) and evaluates test once at the end. An empty split is otherwise found only when it is
first read: for val and test, after all the training. The check asks the task for each
split's examples, as the run will: the sources cache what they read (records, token
documents, prepared shards' lengths), so the run reads nothing twice for it.
"""

from __future__ import annotations

from jtrain.data import sources
from jtrain.data.sources import SPLITS, SourceSpec
from jtrain.errors import DataError, UserError

# What the run does with each split, for the message.
_USE = {
    "train": "it trains on it",
    "val": "it validates on it every eval.every_steps and after the last step",
    "test": "it evaluates it once, after the last step",
}


def check_not_empty(config, task, splits=SPLITS) -> None:
    """Raises DataError naming the first of `splits` that has no examples (for train: in any
    source of a mixture, each of which is trained on; for val and test: in all of them, which
    are evaluated as one), and what to do about it."""
    specs = task.source_specs(config.data.source)
    for split in splits:
        try:
            sizes = [len(task.examples(spec, split)) for spec in specs]
        except NotImplementedError:
            return  # the task reads no examples (grpo samples rollouts) and checks its own
        except UserError:
            raise
        except ValueError as err:  # the data modules' word for data they cannot use
            raise DataError(str(err)) from err
        empty = [spec for spec, size in zip(specs, sizes, strict=True) if not size]
        if empty and (split == "train" or len(empty) == len(specs)):
            raise DataError(_message(config.data.source, task, empty[0], split))


def _message(source: str, task, spec: SourceSpec, split: str) -> str:
    which = f"data.source={source!r}" if str(spec) == source else f"{spec} in data.source"
    counts = ", ".join(f"{s} {len(task.examples(spec, s)):,}" for s in SPLITS)
    return (
        f"the {split} split of {which} is empty (examples: {counts}), and the run needs it: "
        f"{_USE[split]}. {_remedy(spec, split)}"
    )


def _remedy(spec: SourceSpec, split: str) -> str:
    """What to do about an empty split of one source, by the kind of source."""
    if spec.kind == "files":
        globs = sources.split_globs(spec.target)
        if globs is None:
            return (
                "files:GLOB sends each record to a split by a hash of its content (80% train, "
                "10% val, 10% test), so a few records can leave a split empty: add records "
                "(a few dozen fill every split), or name each split's files yourself: "
                "files:train=GLOB;val=GLOB;test=GLOB."
            )
        if split not in globs:
            return f"It names no {split}=GLOB, and a split not named is empty: add one."
        return f"{split}={globs[split]} holds no usable record (see the skipped ones above)."
    if spec.kind == "prepared":
        return (
            f"Prepare {spec.target} again with more documents, or with --splits giving "
            f"{split} a share."
        )
    if spec.kind == "python":
        return f"Make {spec.target}({split!r}) return usable records."
    return f"Give the source {split} examples."
