r"""Predicts with a trained classify or regress run: a table or a folder of images in, a CSV out.

    python -m jtrain.predict --workdir=RUN --input=FILE.csv|FILE.parquet|DIR --output=OUT.csv \
        [--step=N --batch_size=256]

The run's saved preprocessing is applied as in training, so no training data is needed. A table
needs every feature column the run was fitted on (others, a target or `split` among them, are
ignored); a directory's PNG/JPEG files (recursively, in path order) are resized as in training.
Bad rows and unreadable images are skipped and counted on stderr, the first few named as
`file:row` or path. OUT.csv has `row` (the row number, as errors report it) or `path`, then
`predicted` (the class name, or the value in the target's units) and, for classify,
`prob_<class>` per class; it is written to a temporary file and renamed (replacing any old one).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from jtrain import atomic, checkpoint, cli, runs, tasks
from jtrain.data import image_folder, tables
from jtrain.data.features import IMAGE, Preprocessor
from jtrain.tasks.supervised import SupervisedTask

BATCH_SIZE = 256


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The examples read from --input, as the model reads them, and those skipped."""

    source: str  # --input
    id_name: str  # the output's first column: "row" (tables) or "path" (images)
    ids: list  # one per example
    arrays: dict[str, np.ndarray]  # Preprocessor.transform_features' output
    bad: dict  # the skipped rows or files, as RawSplit.bad


@dataclasses.dataclass(frozen=True)
class Summary:
    """How many examples were predicted and how many skipped."""

    predicted: int
    skipped: int


@dataclasses.dataclass(frozen=True)
class Head:
    """What one objective computes from the model's scores and writes per example."""

    on_device: Callable[[jax.Array], jax.Array]  # scores [B, outputs] -> values per example
    columns: Callable[[Preprocessor, np.ndarray], dict[str, list]]  # values -> output columns


def _probabilities(scores_BxK: jax.Array) -> jax.Array:
    return jnp.exp(jax.nn.log_softmax(scores_BxK.astype(jnp.float32), axis=-1))  # as eval's


def _class_columns(pre: Preprocessor, probs_NxK: np.ndarray) -> dict[str, list]:
    columns = {"predicted": [pre.classes[i] for i in np.argmax(probs_NxK, axis=1)]}
    for k, name in enumerate(pre.classes):  # str(float32): the shortest text that reads back
        columns[f"prob_{name}"] = [str(p) for p in probs_NxK[:, k]]
    return columns


def _value_columns(pre: Preprocessor, values_N: np.ndarray) -> dict[str, list]:
    return {"predicted": [repr(float(v)) for v in pre.target_to_original(values_N)]}


HEADS = {  # by Preprocessor.objective
    "classify": Head(_probabilities, _class_columns),
    "regress": Head(lambda scores_Bx1: scores_Bx1[:, 0], _value_columns),
}


class Predictor:
    """A finished run's preprocessing and model; the forward pass compiles once."""

    def __init__(self, preprocessor: Preprocessor, model: nnx.Module, batch_size: int):
        self.preprocessor, self.batch_size = preprocessor, batch_size
        self.head = HEADS[preprocessor.objective]
        graphdef, self._state = nnx.split(model)
        on_device = self.head.on_device
        self._forward = jax.jit(lambda state, inputs: on_device(nnx.merge(graphdef, state)(inputs)))

    @classmethod
    def load(cls, workdir: str, *, step: int | None = None, batch_size: int = BATCH_SIZE):
        """The run in `workdir` with its weights at `step` (None = its final weights)."""
        preprocessor = load_preprocessor(workdir)
        return cls(preprocessor, runs.trained_model(workdir, step=step), batch_size)

    def __call__(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The head's values for every example, batch_size at a time (the last one padded)."""
        n, size = len(next(iter(arrays.values()))), self.batch_size
        outputs = []
        for start in range(0, n, size):
            batch = {
                key: _padded(array[start : start + size], size) for key, array in arrays.items()
            }
            outputs.append(self._forward(self._state, batch))  # dispatched before any is read
        return np.concatenate([np.asarray(out) for out in outputs])[:n]


def load_preprocessor(workdir: str) -> Preprocessor:
    """The preprocessing a classify or regress run (or a distilled student of one) saved;
    errors for other runs."""
    config = runs.run_config(workdir)
    name = config.get("task", "")
    trained = tasks.task_class(name).trains(config)
    if not issubclass(trained, SupervisedTask):
        raise ValueError(
            f"--workdir={workdir} is a run of task={name}; jtrain.predict is for the tables "
            "and images of task=classify or regress; for language models use jtrain.generate"
        )
    task = trained(config)
    task.load_artifacts(runs.saved_artifacts(workdir, task))
    return task.preprocessor


def read_input(pre: Preprocessor, path: str) -> Inputs:
    """--input's examples: a table's rows or a directory's images, as the run reads them."""
    if pre.image_shape is not None:
        size = pre.image_shape[0]
        if not os.path.isdir(path):
            raise ValueError(
                f"--input={path} is a file, but the run's model reads images: "
                "give a directory of PNG/JPEG files"
            )
        if pre.image_shape != (size, size, 3):
            raise ValueError(
                f"the run's model reads images of shape {pre.image_shape}, not the square "
                "RGB images an image folder gives (it was trained on another kind of source)"
            )
        images, paths, bad = image_folder.read_images(path, size)
        return Inputs(path, "path", paths, pre.transform_features({IMAGE: images}), bad)
    numeric, categorical = [c.name for c in pre.numeric], [c.name for c in pre.categorical]
    if os.path.isdir(path):
        raise ValueError(
            f"--input={path} is a directory of images, but the run's model reads table columns "
            f"({', '.join(map(repr, numeric + categorical))}): give a csv or parquet file"
        )
    features, rows, bad = tables.read_features(path, numeric=numeric, categorical=categorical)
    return Inputs(path, "row", rows.tolist(), pre.transform_features(features), bad)


def _padded(array: np.ndarray, size: int) -> np.ndarray:
    """`array` with zero rows after it up to `size` rows (zeros: a valid input of any key)."""
    pad = size - len(array)
    return np.concatenate([array, np.zeros((pad, *array.shape[1:]), array.dtype)]) if pad else array


def check_flags(input_path: str, output: str, batch_size: int = BATCH_SIZE) -> None:
    """Raises before any work if --input cannot be read or --output cannot be written."""
    if batch_size < 1:
        raise ValueError(f"--batch_size={batch_size} is invalid: it must be at least 1")
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"--input={input_path}: no such file or directory")
    if os.path.isfile(input_path) and tables.table_kind(input_path) is None:
        raise ValueError(
            f"--input={input_path}: unknown extension; give a table file "
            f"({', '.join(tables.TABLE_SUFFIXES)}) or a directory of images"
        )
    if os.path.isdir(output):
        raise IsADirectoryError(f"--output={output} is a directory; name a CSV file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise FileNotFoundError(f"--output={output}: its directory does not exist; create it")


def write_predictions(
    predictor: Predictor, inputs: Inputs, output: str, *, report: Callable[[str], None] = _stderr
) -> Summary:
    """Reports the skipped examples, then writes the predictions of the others to `output`
    (atomically); a ValueError, and nothing written, when there are none."""
    bad = inputs.bad
    if bad["count"]:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in bad["kinds"].items())
        report(f"jtrain: skipped {bad['count']} of {inputs.source} ({kinds}), e.g.:")
        for example in bad["examples"]:
            report(f"  {example}")
    if not inputs.ids:
        raise ValueError(f"{inputs.source} has nothing to predict ({bad['count']} skipped)")
    values = predictor(inputs.arrays)
    columns = predictor.head.columns(predictor.preprocessor, values)

    def write_csv(temporary: str) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([inputs.id_name, *columns])
            writer.writerows(zip(inputs.ids, *columns.values(), strict=True))

    atomic.write(output, write_csv)
    return Summary(len(inputs.ids), int(bad["count"]))


def predict(
    workdir: str,
    input_path: str,
    output: str,
    *,
    step: int | None = None,
    batch_size: int = BATCH_SIZE,
    report: Callable[[str], None] = _stderr,
) -> Summary:
    """What the command does: checks the paths and reads the input (so a wrong one fails in
    seconds, before the model loads), then predicts it with the run's model."""
    check_flags(input_path, output, batch_size)
    preprocessor = load_preprocessor(workdir)
    inputs = read_input(preprocessor, input_path)
    predictor = Predictor(preprocessor, runs.trained_model(workdir, step=step), batch_size)
    return write_predictions(predictor, inputs, output, report=report)


def _define_flags() -> None:
    """Defines the CLI flags; only when run as a program, so importing never claims names."""
    flags.DEFINE_string("workdir", None, "The workdir of a classify or regress run.")
    flags.DEFINE_string("input", None, "A csv or parquet file, or a directory of images.")
    flags.DEFINE_string("output", None, "The CSV file to write.")
    flags.DEFINE_integer("step", None, "The run's checkpoint step (default: its final weights).")
    flags.DEFINE_integer("batch_size", BATCH_SIZE, "Examples per forward pass.")


def main(argv: list[str]) -> None:
    cli.start(argv)
    f = flags.FLAGS
    try:
        summary = predict(f.workdir, f.input, f.output, step=f.step, batch_size=f.batch_size)
    except (checkpoint.CheckpointError, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    print(
        f"jtrain: predicted {summary.predicted} examples ({summary.skipped} skipped) to {f.output}"
    )


def command() -> None:
    """The `jtrain-predict` command (python -m jtrain.predict)."""
    _define_flags()
    flags.mark_flags_as_required(["workdir", "input", "output"])
    cli.run(main)


if __name__ == "__main__":
    command()
