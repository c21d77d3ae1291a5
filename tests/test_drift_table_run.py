"""End to end on a table: a tiny classify run saves its drift profile at the end of training;
`python -m jtrain.drift` on a CSV with two shifted columns exits 1 naming exactly those, on a
CSV from the training distribution exits 0; a run without a profile is a one-line error."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jtrain import config as config_lib
from jtrain import run as run_lib
from jtrain.drift import cli, profile
from jtrain.errors import UserError
from tests import drift_synthetic
from tests.conftest import REPO, main_env

SHIFTED = ("normal", "colour")


def _write_csv(path, columns: dict, label: np.ndarray | None = None) -> str:
    if label is not None:
        columns = {**columns, "label": label}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in zip(*columns.values(), strict=True):
            writer.writerow(["" if isinstance(v, float) and np.isnan(v) else v for v in row])
    return str(path)


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    columns = drift_synthetic.table(1200, np.random.default_rng(0))
    label = np.where(columns["normal"] + (columns["colour"] == "red") > 0.5, "yes", "no")
    source = _write_csv(data / "train.csv", columns, label)
    config = config_lib.load(os.path.join(REPO, "configs/tabular_classify.py"))
    config.model.update({"width": 16, "depth": 1, "dropout": 0.0, "embed_dim": 4})
    config.data.source, config.data.target = f"csv:{source}", "label"
    config.train.epochs, config.train.log_every = 1, 1000
    workdir = str(tmp_path_factory.mktemp("run"))
    config.drift.profile = True  # on in the recipe; the end-of-run hook writes it
    run_lib.train_and_evaluate(config, workdir)
    fresh = drift_synthetic.table(400, np.random.default_rng(1))
    shifted = drift_synthetic.table(400, np.random.default_rng(2), dict.fromkeys(SHIFTED, 1.0))
    return workdir, _write_csv(data / "same.csv", fresh), _write_csv(data / "shifted.csv", shifted)


def test_the_profile_summarises_every_column_and_the_predictions(table_run):
    workdir = table_run[0]
    content, sample = profile.load(workdir)
    by_name = {c["name"]: c for c in content["columns"]}
    assert set(by_name) == {
        *drift_synthetic.NUMERIC,
        *drift_synthetic.CATEGORICAL,
        "predicted_class",
        "confidence",
    }
    assert 0.05 < by_name["with_missing"]["missing"] < 0.15  # 10% missing by construction
    assert len(by_name["normal"]["quantiles"]) == 21
    assert set(by_name["colour"]["frequencies"]) == {"red", "green", "blue", "grey"}
    assert content["rows"] == len(sample.columns["normal"].values) < 1200  # the train split


def test_shifted_columns_exit_1_and_are_named(table_run, tmp_path):
    workdir, _, shifted = table_run
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jtrain.drift",
            f"--workdir={workdir}",
            f"--data=csv:{shifted}",
            f"--output={tmp_path}",
        ],
        cwd=REPO,
        env=main_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert sorted(report["drifting_features"]) == sorted(SHIFTED)
    assert "normal" in result.stdout and "colour" in result.stdout
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_same_distribution_exits_0(table_run, tmp_path):
    workdir, same, _ = table_run
    assert cli.run(workdir, f"csv:{same}", str(tmp_path)) == cli.NO_DRIFT
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["drifting_features"] == [] and report["domain_classifier"]["drift"] is False


def test_errors_are_one_line_with_status_2(table_run, tmp_path):
    workdir, same, _ = table_run
    with pytest.raises(profile.ProfileError, match="no column 'counts'"):
        columns = drift_synthetic.table(50, np.random.default_rng(3))
        del columns["counts"]
        cli.run(workdir, f"csv:{_write_csv(tmp_path / 'bad.csv', columns)}", str(tmp_path))
    with pytest.raises(UserError, match="--permutations=1 is invalid"):
        cli.run(workdir, f"csv:{same}", str(tmp_path), permutations=1)
    with pytest.raises(UserError, match="--data is required"):
        cli.run(workdir, None, str(tmp_path))
    bare = tmp_path / "old_run"
    os.makedirs(bare)
    for name in ("config.json", "preprocessing.json"):
        with open(os.path.join(workdir, name)) as src, open(bare / name, "w") as dst:
            dst.write(src.read())
    result = subprocess.run(
        [sys.executable, "-m", "jtrain.drift", f"--workdir={bare}", f"--data=csv:{same}"],
        cwd=REPO,
        env=main_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "--write_profile" in result.stderr
    assert result.stderr.count("\n") == 1
