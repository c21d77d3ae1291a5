"""The supervised data layer: sklearn sets, csv/parquet tables, image folders, Preprocessor."""

import csv
import json
import random

import numpy as np
import pytest

from jtrain.data import supervised
from jtrain.data.features import Preprocessor
from jtrain.data.supervised import check_source, is_supervised, load_split

SPLITS = ("train", "val", "test")

# Golden split sizes: the hashed split must not drift silently.
SKLEARN_SIZES = {
    "digits": (1241, 280, 276),
    "breast_cancer": (399, 82, 88),
    "iris": (91, 22, 37),
    "wine": (124, 26, 28),
    "diabetes": (307, 67, 68),
}


def _splits(source, **options):
    return {split: load_split(source, split, **options) for split in SPLITS}


def _rows_of(raw) -> list[bytes]:
    """Each row of a split's features as bytes, to compare splits as multisets."""
    columns = [np.asarray(c).reshape(len(c), -1) for c in raw.features.values()]
    return [row.tobytes() for row in np.concatenate(columns, axis=1)]


@pytest.mark.parametrize("name", sorted(SKLEARN_SIZES))
def test_sklearn_sets_split_the_whole_set_once(name):
    from sklearn import datasets

    loader = getattr(datasets, f"load_{name}")
    bunch = loader(scaled=False) if name == "diabetes" else loader()
    splits = _splits(f"sklearn:{name}")
    assert tuple(len(splits[s]) for s in SPLITS) == SKLEARN_SIZES[name]
    everything = np.concatenate([bunch.images[..., None] / 16 if name == "digits" else bunch.data])
    pooled = sorted(row for s in SPLITS for row in _rows_of(splits[s]))
    whole = everything.astype(np.float32 if name == "digits" else np.float64)
    assert pooled == sorted(row.tobytes() for row in whole.reshape(len(whole), -1))
    again = load_split(f"sklearn:{name}", "val")
    assert again is splits["val"]  # cached: read and split once per process
    if name == "diabetes":
        assert splits["train"].class_names is None and splits["train"].target.dtype == np.float64
    else:
        assert splits["train"].class_names == tuple(str(n) for n in bunch.target_names)


def test_digits_are_images_in_unit_range():
    train = load_split("sklearn:digits", "train")
    image = train.features["image"]
    assert image.shape == (len(train), 8, 8, 1) and image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    pre = Preprocessor.fit(train, objective="classify")
    assert pre.classes == tuple(str(i) for i in range(10))
    arrays, report = pre.transform(load_split("sklearn:digits", "test"))
    assert set(arrays) == {"image", "label"} and report["dropped"] == 0
    assert pre.input_spec().image_shape == (8, 8, 1)


def test_sklearn_table_labels_follow_target_names():
    pre = Preprocessor.fit(load_split("sklearn:breast_cancer", "train"), objective="classify")
    assert pre.classes == ("malignant", "benign")
    arrays, _ = pre.transform(load_split("sklearn:breast_cancer", "val"))
    np.testing.assert_array_equal(
        arrays["label"], load_split("sklearn:breast_cancer", "val").target
    )
    assert arrays["numeric"].shape == (82, 30) and pre.input_spec().numeric == 30


# Tables.

HEADER = ["id", "x", "z", "color", "y"]


def _table_rows(n=40):
    """Rows of HEADER: numeric x, numeric z with gaps, categorical color, label y."""
    colors = ["red", "green", "blue"]
    return [
        [
            str(i),
            str(i * 1.5),
            "" if i % 5 == 0 else str(i % 7),
            colors[i % 3],
            "yes" if i % 2 else "no",
        ]
        for i in range(n)
    ]


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _split_column_csv(tmp_path):
    """40 rows: 30 train, 5 val (one of an unseen colour, one unseen label), 5 test."""
    rows = _table_rows()
    for i, row in enumerate(rows):
        row.append("train" if i < 30 else "val" if i < 35 else "test")
    rows[31][3] = "purple"
    rows[32][4] = "maybe"
    return _write_csv(tmp_path / "t.csv", [*HEADER, "split"], rows)


def test_csv_statistics_are_fitted_on_train_only(tmp_path):
    path = _split_column_csv(tmp_path)
    splits = _splits(f"csv:{path}", target="y", features=("x", "z", "color"))
    assert [len(splits[s]) for s in SPLITS] == [30, 5, 5]  # the split column is honoured
    train = splits["train"]
    assert train.features["x"].dtype == np.float64 and train.features["color"].dtype == object
    pre = Preprocessor.fit(train, objective="classify")
    x, z = pre.numeric
    assert x.mean == np.nanmean(train.features["x"]) == np.mean([i * 1.5 for i in range(30)])
    assert x.mean != np.mean([i * 1.5 for i in range(40)])
    assert z.indicator and not x.indicator and z.mean == np.nanmean(train.features["z"])
    assert pre.categorical[0].vocabulary == ("blue", "green", "red")
    assert pre.classes == ("no", "yes")
    spec = pre.input_spec()
    assert spec.numeric == 3 and spec.categories == (4,) and spec.image_shape is None

    arrays, report = pre.transform(splits["val"])
    assert report["dropped"] == 1 and report["unseen_labels"] == ["maybe"]
    assert "'maybe'" in report["message"] and report["rows"] == 4
    assert report["bad"] is splits["val"].bad
    assert arrays["numeric"].shape == (4, 3) and arrays["categorical"].shape == (4, 1)
    kept_x = splits["val"].features["x"][[0, 1, 3, 4]]  # row 32, of label "maybe", dropped
    ids = dict(zip(kept_x, arrays["categorical"][:, 0], strict=True))
    assert ids[31 * 1.5] == 0  # purple: unseen in train
    assert ids[30 * 1.5] == 3  # red
    row_35 = pre.transform(splits["test"])[0]["numeric"][0]  # z is missing in row 35
    assert row_35[1] == 0.0 and row_35[2] == 1.0
    expected = (35 * 1.5 - x.mean) / x.std
    assert row_35[0] == np.float32(expected)


def test_csv_bad_rows_are_counted_with_file_and_row(tmp_path):
    rows = [["1", "2.5", "a", "yes"], ["2", "3.5", "b"], ["3", "abc", "c", "no"]]
    rows += [["4", "1", "a", ""]] + [[str(i), str(i / 2), "b", "no"] for i in range(5, 20)]
    path = _write_csv(tmp_path / "a.csv", ["id", "x", "color", "y"], rows)
    other = _write_csv(tmp_path / "b.csv", ["id", "x", "color", "y"], [["30", "1", "a", "no"]])
    with open(other, "ab") as f:
        f.write(b"31,2,\xff,yes\n")
    splits = _splits(f"csv:{tmp_path}/*.csv", target="y")
    kinds, examples = {}, []
    for s in SPLITS:
        examples += splits[s].bad["examples"]
        for kind, n in splits[s].bad["kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    assert sum(splits[s].bad["count"] for s in SPLITS) == 4
    assert kinds == {"invalid_utf8": 1, "missing_target": 1, "not_a_number": 1, "ragged": 1}
    assert sum(len(splits[s]) for s in SPLITS) == 17
    expected = {
        f"{path}:3: 3 cells, the header has 4",
        f"{path}:4: numeric column 'x' is 'abc'",
        f"{path}:5: the target 'y' is missing",
        f"{other}:3: invalid UTF-8 (invalid start byte)",
    }
    assert f"{path}:3: 3 cells, the header has 4" in examples and set(examples) <= expected
    assert splits["train"].features.keys() == {"id", "x", "color"}  # all but the target


def test_csv_bad_split_value_and_all_bad_rows(tmp_path):
    rows = [["1", "a", "train"], ["2", "b", "train"], ["3", "a", "holdout"]]
    path = _write_csv(tmp_path / "s.csv", ["x", "y", "split"], rows)
    train = load_split(f"csv:{path}", "train", target="y")
    assert len(train) == 2 and train.bad["kinds"] == {"bad_split": 1}
    assert train.bad["examples"] == [f"{path}:4: split is 'holdout', not train, val or test"]
    empty = _write_csv(tmp_path / "e.csv", ["x", "y"], [["1", ""], ["2", ""]])
    with pytest.raises(ValueError, match="every row is bad"):
        load_split(f"csv:{empty}", "train", target="y")


def _splits_by_id(path) -> dict[float, str]:
    splits = _splits(f"csv:{path}", target="y")
    return {i: s for s in SPLITS for i in splits[s].features["id"]}


def test_hashed_split_is_stable_under_row_shuffling(tmp_path):
    rows = _table_rows(200)
    first = _write_csv(tmp_path / "a.csv", HEADER, rows)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    second = _write_csv(tmp_path / "b.csv", HEADER, shuffled)
    by_id = _splits_by_id(first)
    assert by_id == _splits_by_id(second) and len(by_id) == 200
    counts = [sum(s == split for s in by_id.values()) for split in SPLITS]
    assert 110 < counts[0] < 170 and min(counts) > 15  # about 0.7 / 0.15 / 0.15


def test_parquet_gives_the_same_splits_as_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _table_rows(60)
    csv_path = _write_csv(tmp_path / "t.csv", HEADER, rows)
    table = pa.table(
        {
            "id": [int(r[0]) for r in rows],
            "x": [float(r[1]) for r in rows],
            "z": [int(r[2]) if r[2] else None for r in rows],
            "color": [r[3] for r in rows],
            "y": [r[4] for r in rows],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    from_csv = _splits(f"csv:{csv_path}", target="y")
    from_parquet = _splits(f"parquet:{tmp_path}/*.parquet", target="y")
    for s in SPLITS:
        a, b = from_csv[s], from_parquet[s]
        assert a.features.keys() == b.features.keys()
        for name in a.features:
            np.testing.assert_array_equal(a.features[name], b.features[name])
        np.testing.assert_array_equal(a.target, b.target)
    assert np.isnan(from_parquet["train"].features["z"]).any()


def test_regress_target_is_standardised_and_inverted():
    train, val = (load_split("sklearn:diabetes", s) for s in ("train", "val"))
    pre = Preprocessor.fit(train, objective="regress")
    assert pre.target_mean == np.mean(train.target) and pre.target_std == np.std(train.target)
    arrays, report = pre.transform(train)
    assert abs(arrays["target"].mean()) < 1e-5 and abs(arrays["target"].std() - 1) < 1e-5
    assert report["rows"] == len(train) and "label" not in arrays
    back = pre.target_to_original(pre.transform(val)[0]["target"])
    np.testing.assert_allclose(back, val.target, rtol=1e-5)
    labels = np.array(["a"] * len(train), dtype=object)
    with pytest.raises(ValueError, match="numeric target"):
        Preprocessor.fit(
            supervised.RawSplit(train.features, labels, None, train.bad), objective="regress"
        )


def test_preprocessor_json_round_trip_gives_identical_transforms(tmp_path):
    path = _split_column_csv(tmp_path)
    splits = _splits(f"csv:{path}", target="y", features=("x", "z", "color"))
    pre = Preprocessor.fit(splits["train"], objective="classify")
    again = Preprocessor.from_json(json.loads(json.dumps(pre.to_json())))
    assert again == pre
    for s in SPLITS:
        ours, theirs = pre.transform(splits[s])[0], again.transform(splits[s])[0]
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key])
    new = again.transform_features({"x": [1.5, None], "z": [None, 3], "color": ["red", "pink"]})
    assert new["categorical"].tolist() == [[3], [0]] and new["categorical"].dtype == np.int32
    x, z = pre.numeric
    expected = [[(1.5 - x.mean) / x.std, 0.0, 1.0], [0.0, (3 - z.mean) / z.std, 0.0]]
    np.testing.assert_array_equal(new["numeric"], np.float32(expected))
    features = dict(splits["val"].features)
    del features["z"]
    with pytest.raises(ValueError, match="'z' is missing"):
        again.transform_features(features)


# Image folders.


def _write_image(path, seed: int, mode: str = "RGB", fmt: str = "PNG"):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode != "RGB" else image).save(path, fmt)


def test_image_folder_hashed_split_and_corrupt_image(tmp_path):
    for c, (name, suffix, fmt) in enumerate([("cat", "png", "PNG"), ("dog", "jpg", "JPEG")]):
        (tmp_path / name).mkdir()
        for i in range(12):
            mode = "L" if i == 0 else "RGB"  # grayscale becomes 3 channels
            _write_image(tmp_path / name / f"{i}.{suffix}", 100 * c + i, mode, fmt)
    (tmp_path / "cat" / "copy.png").write_bytes((tmp_path / "cat" / "3.png").read_bytes())
    broken = tmp_path / "dog" / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    splits = _splits(f"images:{tmp_path}", image_size=16)
    assert sum(len(splits[s]) for s in SPLITS) == 25
    for s in SPLITS:
        image = splits[s].features["image"]
        assert image.shape == (len(splits[s]), 16, 16, 3) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert set(splits[s].target) <= {"cat", "dog"}
    assert sum(splits[s].bad["count"] for s in SPLITS) == 1
    examples = [e for s in SPLITS for e in splits[s].bad["examples"]]
    assert len(examples) == 1 and examples[0].startswith(f"{broken}: cannot decode")
    # The same bytes land in the same split: 3.png and copy.png are one picture.
    seen: dict[bytes, list[str]] = {}
    for s in SPLITS:
        for image in splits[s].features["image"]:
            seen.setdefault(image.tobytes(), []).append(s)
    twice = [where for where in seen.values() if len(where) > 1]
    assert len(twice) == 1 and twice[0][0] == twice[0][1]
    pre = Preprocessor.fit(splits["train"], objective="classify")
    assert pre.classes == ("cat", "dog") and pre.input_spec().image_shape == (16, 16, 3)


def test_image_folder_with_split_folders(tmp_path):
    counts = {"train": 4, "val": 2, "test": 1}
    for s, n in counts.items():
        for name in ("ant", "bee"):
            (tmp_path / s / name).mkdir(parents=True)
            for i in range(n):
                _write_image(tmp_path / s / name / f"{i}.png", hash((s, name, i)) % 1000)
    splits = _splits(f"images:{tmp_path}", image_size=8)
    assert {s: len(splits[s]) for s in SPLITS} == {s: 2 * n for s, n in counts.items()}
    assert sorted(splits["val"].target) == ["ant", "ant", "bee", "bee"]


# Sources: names and errors.


def test_is_supervised():
    assert is_supervised("sklearn:iris") and is_supervised("csv:/x/*.csv")
    assert is_supervised("images:/data") and is_supervised("parquet:a.parquet")
    assert not is_supervised("pydoc_topics") and not is_supervised("files:x.jsonl")
    assert not is_supervised("prepared:/data") and not is_supervised(None)


@pytest.mark.parametrize(
    "source",
    ["sklearn:nope", "tsv:data.tsv", "csv:/no/such/*.csv", "images:/no/such/dir", "sklearn:"],
)
def test_check_source_names_the_key_and_lists_the_kinds(source):
    with pytest.raises(ValueError) as error:
        check_source(source, target="y", features=())
    message = str(error.value)
    assert message.startswith(f"data.source={source!r} is invalid")
    for allowed in ("sklearn:digits", "sklearn:diabetes", "csv:PATH", "parquet:PATH", "images:DIR"):
        assert allowed in message


def test_check_source_table_keys(tmp_path):
    path = _write_csv(tmp_path / "t.csv", HEADER, _table_rows(5))
    check_source(f"csv:{path}", target="y", features=("x",))
    with pytest.raises(ValueError, match="data.target"):
        check_source(f"csv:{path}", target="", features=())
    with pytest.raises(ValueError, match="data.target='label' is not a column"):
        check_source(f"csv:{path}", target="label", features=())
    with pytest.raises(ValueError, match="data.features: 'w' is not a column"):
        check_source(f"csv:{path}", target="y", features=("x", "w"))
    with pytest.raises(ValueError, match="Unknown split"):
        supervised.load_split(f"csv:{path}", "dev", target="y")
