"""python -m jtrain.predict: a trained run's predictions for new tables and image folders equal
its own forward pass, bad rows and images are skipped and reported, wrong inputs are errors."""

import csv
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import supervised as recipes
from jtrain import checkpoint, predict, runs
from jtrain import config as config_lib
from jtrain.data.supervised import load_split
from jtrain.run import train_and_evaluate
from tests.conftest import REPO, main_env

SMALL_MLP = {"width": 16, "depth": 1, "dropout": 0.0, "embed_dim": 4}


def _train(tmp_path_factory, name: str, config) -> str:
    config.train.epochs = 2
    config.train.log_every = 1000
    workdir = str(tmp_path_factory.mktemp(name))
    train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    config = config_lib.load(os.path.join(REPO, "configs/tabular_classify.py"))
    config.model.update(SMALL_MLP)
    return _train(tmp_path_factory, "classify", config)


@pytest.fixture(scope="module")
def predictor(classify_run):
    return predict.Predictor.load(classify_run, batch_size=32)


def _write_csv(path, columns: dict[str, list]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values(), strict=True))
    return str(path)


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _predict(predictor, path, output):
    """Predicts in-process; returns (summary, output rows, reported lines)."""
    reported = []
    inputs = predict.read_input(predictor.preprocessor, str(path))
    summary = predict.write_predictions(predictor, inputs, str(output), report=reported.append)
    return summary, _read_csv(output), reported


def _table_columns(raw, rows=None) -> dict[str, list]:
    """A RawSplit's feature columns as CSV text (repr: floats read back exactly)."""
    rows = range(len(raw)) if rows is None else rows
    return {name: [repr(float(column[i])) for i in rows] for name, column in raw.features.items()}


def test_test_split_predictions_are_the_models_probabilities(classify_run, predictor, tmp_path):
    test = load_split("sklearn:breast_cancer", "test")
    columns = _table_columns(test)
    columns["target"] = [str(t) for t in test.target]  # ignored, as is a split column
    columns["split"] = ["test"] * len(test)
    source = _write_csv(tmp_path / "test.csv", columns)
    summary, out, reported = _predict(predictor, source, tmp_path / "out.csv")
    assert summary == predict.Summary(predicted=len(test), skipped=0) and reported == []
    assert [int(row["row"]) for row in out] == list(range(2, len(test) + 2))  # header is row 1

    classes = predictor.preprocessor.classes
    probs = np.array([[float(row[f"prob_{c}"]) for c in classes] for row in out])
    assert [row["predicted"] for row in out] == [classes[i] for i in np.argmax(probs, axis=1)]
    # The run's own model and preprocessing on the same rows, in one unpadded batch.
    task = runs.run_task(classify_run)
    arrays, _ = task.preprocessor.transform(test)
    model = runs.trained_model(classify_run)
    expected = jax.nn.softmax(model({"numeric": arrays["numeric"]}), axis=-1)
    np.testing.assert_allclose(probs, np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert (np.argmax(probs, axis=1) == arrays["label"]).mean() > 0.7  # it learned something


def test_a_new_table_with_other_columns_in_any_order(predictor, tmp_path):
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    names = list(bunch.feature_names)
    order = np.random.default_rng(0).permutation(len(names))
    columns = {names[j]: [repr(float(x)) for x in bunch.data[:40, j]] for j in order}
    columns["note"] = ["extra"] * 40
    summary, out, _ = _predict(predictor, _write_csv(tmp_path / "new.csv", columns), tmp_path / "o")
    assert summary.predicted == 40
    assert list(out[0]) == ["row", "predicted", "prob_malignant", "prob_benign"]
    same = {name: [repr(float(x)) for x in bunch.data[:40, names.index(name)]] for name in names}
    _, again, _ = _predict(predictor, _write_csv(tmp_path / "same.csv", same), tmp_path / "o2")
    assert [row["prob_benign"] for row in out] == [row["prob_benign"] for row in again]

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: bunch.data[:40, j] for j, name in enumerate(names)})
    pq.write_table(table, tmp_path / "new.parquet")
    _, parquet, _ = _predict(predictor, tmp_path / "new.parquet", tmp_path / "o3")
    assert [int(row["row"]) for row in parquet] == list(range(1, 41))  # parquet counts from 1
    assert [row["prob_benign"] for row in parquet] == [row["prob_benign"] for row in out]


def test_missing_column_is_an_error_and_bad_rows_are_skipped(predictor, tmp_path):
    test = load_split("sklearn:breast_cancer", "test")
    columns = _table_columns(test, range(10))
    del columns["mean texture"]
    with pytest.raises(ValueError, match="no column 'mean texture'"):
        _predict(predictor, _write_csv(tmp_path / "missing.csv", columns), tmp_path / "o.csv")

    columns = _table_columns(test, range(10))
    columns["worst area"][3] = "abc"
    path = _write_csv(tmp_path / "bad.csv", columns)
    summary, out, reported = _predict(predictor, path, tmp_path / "out.csv")
    assert summary == predict.Summary(predicted=9, skipped=1)
    assert [int(row["row"]) for row in out] == [2, 3, 4, 6, 7, 8, 9, 10, 11]  # row 5 skipped
    assert f"{path}:5: numeric column 'worst area' is 'abc'" in "\n".join(reported)


def test_regress_predicts_in_the_targets_units(tmp_path_factory, tmp_path):
    model = {"kind": "mlp", **SMALL_MLP, "linear_skip": True}
    config = recipes.base("regress", "sklearn:diabetes", model)
    workdir = _train(tmp_path_factory, "regress", config)
    test = load_split("sklearn:diabetes", "test")
    source = _write_csv(tmp_path / "d.csv", _table_columns(test))
    summary = predict.predict(workdir, source, str(tmp_path / "out.csv"))
    values = np.array([float(row["predicted"]) for row in _read_csv(tmp_path / "out.csv")])
    assert summary.predicted == len(test) == len(values)
    # Diabetes progression runs from 25 to 346 (mean 152): predictions are in those units.
    assert test.target.min() < values.mean() < test.target.max() and values.std() > 1


def _solid_png(path, colour) -> None:
    from PIL import Image

    Image.new("RGB", (12, 10), colour).save(path, "PNG")


def test_images_folder_predicts_and_skips_a_corrupt_file(tmp_path_factory, tmp_path):
    train_dir = tmp_path / "train_images"
    for split, count in (("train", 8), ("val", 2), ("test", 2)):
        for name, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
            (train_dir / split / name).mkdir(parents=True)
            for i in range(count):
                _solid_png(train_dir / split / name / f"{i}.png", tuple(c + 3 * i for c in colour))
    # An MLP of the flattened pixels: a CNN compiles for ~30 s on 2 CPU cores.
    model = {"kind": "mlp", **SMALL_MLP, "image_size": 8}
    config = recipes.base("classify", f"images:{train_dir}", model)
    config.train.batch_size = 8
    workdir = _train(tmp_path_factory, "images", config)
    shutil.rmtree(train_dir)  # prediction needs only the run

    new = tmp_path / "new"
    (new / "sub").mkdir(parents=True)
    _solid_png(new / "b.png", (200, 30, 30))
    _solid_png(new / "sub" / "a.png", (30, 30, 200))
    (new / "c.png").write_bytes(b"not a png")
    reported = []
    out = tmp_path / "images.csv"
    summary = predict.predict(workdir, str(new), str(out), report=reported.append)
    assert summary == predict.Summary(predicted=2, skipped=1)
    assert f"{new / 'c.png'}: cannot decode" in "\n".join(reported)
    rows = _read_csv(out)
    assert [row["path"] for row in rows] == [str(new / "b.png"), str(new / "sub" / "a.png")]
    assert list(rows[0]) == ["path", "predicted", "prob_blue", "prob_red"]
    for row in rows:
        probs = [float(row["prob_blue"]), float(row["prob_red"])]
        assert row["predicted"] == ("blue", "red")[int(np.argmax(probs))]
        assert abs(sum(probs) - 1) < 1e-5

    table = _write_csv(tmp_path / "t.csv", {"x": ["1"]})
    with pytest.raises(ValueError, match="reads images: give a directory"):
        predict.predict(workdir, table, str(tmp_path / "o.csv"))


def test_errors_name_what_is_wrong(classify_run, tmp_path):
    unknown = tmp_path / "rows.txt"
    unknown.write_text("x\n1\n")
    images = tmp_path / "images"
    images.mkdir()
    lm_run = tmp_path / "lm"
    lm_run.mkdir()
    (lm_run / "config.json").write_text('{"task": "lm"}')
    cases = [
        (tmp_path, images, "is not a jtrain workdir"),
        (classify_run, tmp_path / "no.csv", "no.csv: no such file"),
        (classify_run, unknown, "unknown extension"),
        (classify_run, images, "is a directory of images, but the run's model reads table"),
        (lm_run, images, "for language models use jtrain.generate"),
    ]
    for workdir, source, expected in cases:
        with pytest.raises((ValueError, OSError, checkpoint.CheckpointError)) as error:
            predict.predict(str(workdir), str(source), str(tmp_path / "o.csv"))
        assert expected in str(error.value)
    assert not os.path.exists(tmp_path / "o.csv")


def test_cli_reports_skipped_rows_and_a_summary(classify_run, tmp_path):
    columns = _table_columns(load_split("sklearn:breast_cancer", "val"), range(5))
    columns["worst area"][1] = "?"
    source = _write_csv(tmp_path / "val.csv", columns)
    output = tmp_path / "out.csv"
    command = [sys.executable, "-m", "jtrain.predict", f"--workdir={classify_run}"]
    command += [f"--input={source}", f"--output={output}"]
    done = subprocess.run(
        command, cwd=REPO, env=main_env(1), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"jtrain: predicted 4 examples (1 skipped) to {output}"
    assert f"{source}:3: numeric column 'worst area' is '?'" in done.stderr
    assert [row["row"] for row in _read_csv(output)] == ["2", "4", "5", "6"]
