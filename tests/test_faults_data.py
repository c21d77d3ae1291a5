"""Bad data and evaluation splits (issue 11, items 6 and 14): an empty split is refused before
training, an evaluation that fails keeps the steps trained, and damaged inputs (invalid UTF-8,
truncated shards, corrupt gzip, truncated safetensors, broken model directories) are skipped
and counted, or refused with one error that names the file."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jtrain import config as config_lib
from jtrain import run, tasks
from jtrain.data import prepare, records, sources, splits
from jtrain.errors import DataError
from jtrain.interop import safetensors_io
from jtrain.tasks import preference_examples
from tests import faults
from tests.conftest import REPO, tiny_config


def _docs_in(split: str, count: int) -> list[str]:
    """`count` documents that a files: source sends to `split`."""
    docs = (f"document number {i} of a tiny corpus" for i in range(10_000))
    key = sources.text_split_key
    return [d for d in docs if records.split_of(key("text", {"text": d})) == split][:count]


def _jsonl(path, texts) -> str:
    return faults.write_lines(path, [json.dumps({"text": t}) for t in texts])


# Item 6: an empty split is refused before training; a failing evaluation keeps the steps.


def test_empty_val_split_is_refused_before_training(tmp_path):
    source = _jsonl(tmp_path / "three.jsonl", _docs_in("train", 3))
    workdir = tmp_path / "run"
    config = tiny_config(data__source=f"files:{source}", train__steps=2)
    with pytest.raises(DataError) as refused:
        run.train_and_evaluate(config, str(workdir))
    message = str(refused.value)
    assert "the val split of data.source=" in message and "train 3, val 0, test 0" in message
    assert "files:train=GLOB;val=GLOB;test=GLOB" in message
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def test_each_kind_of_source_says_what_to_do_about_an_empty_split(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", _docs_in("train", 3))
    val = _jsonl(tmp_path / "val.jsonl", _docs_in("val", 2))
    config = tiny_config(data__source=f"files:train={train};val={val}")
    with pytest.raises(DataError, match="the test split .* names no test=GLOB"):
        splits.check_not_empty(config, tasks.get(config))
    prepared = tmp_path / "prepared"
    prepare.prepare(train, str(prepared), splits=(1, 0, 0))
    config = tiny_config(data__source=f"prepared:{prepared}")
    with pytest.raises(DataError, match=f"val split .* Prepare {prepared} again .* --splits"):
        splits.check_not_empty(config, tasks.get(config))
    mixture = tiny_config(data__source=f"prepared:{prepared},pydoc_topics")
    splits.check_not_empty(mixture, tasks.get(mixture))  # val and test come from pydoc_topics


def test_a_failing_evaluation_keeps_the_last_step_and_the_run_resumes(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    config = tiny_config(train__steps=3, eval__every_steps=0, checkpoint__every_steps=0)
    faults.failing_evaluation(monkeypatch, "val")
    with pytest.raises(DataError, match="injected fault"):
        run.train_and_evaluate(config, workdir)
    assert os.listdir(faults.step_dir(workdir, 3))  # saved before the error ended the run
    monkeypatch.undo()
    results = run.train_and_evaluate(config, workdir)  # resumes at step 3: nothing retrained
    assert {"val", "test"} <= results.keys()


# Item 14: damaged inputs name their file, and bad records are skipped and counted.


def test_invalid_utf8_in_valid_json_is_a_counted_bad_record(tmp_path):
    # JSON escapes may encode a lone surrogate, which no UTF-8 can hold: a tokenizer fails on it.
    lines = [json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) for i in range(9)]
    lines.insert(4, '{"prompt": "q\\udc80", "chosen": "yes", "rejected": "no"}')
    path = faults.write_lines(tmp_path / "pairs.jsonl", lines)
    spec = sources.SourceSpec("files", path)
    got = [sources.load_records(spec, s, preference_examples.split_key) for s in sources.SPLITS]
    assert sum(map(len, got)) == 9
    assert dict(got[0].skipped.counts) == {"invalid_utf8": 1}
    assert got[0].skipped.examples == [
        f"{path}:5: invalid UTF-8: a lone surrogate \\udc80 at character 2"
    ]


def test_one_bad_parquet_string_loses_its_row_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [f"row {i}".encode() for i in range(5)] + [b"bad \xff byte"]
    column = pa.array(cells, pa.binary()).cast(pa.string(), safe=False)  # unchecked, as on disk
    pq.write_table(pa.table({"text": column}), tmp_path / "t.parquet")
    spec = sources.SourceSpec("files", str(tmp_path / "t.parquet"))
    key = functools.partial(sources.text_split_key, "text")
    got = [sources.load_records(spec, s, key) for s in sources.SPLITS]
    assert sum(map(len, got)) == 5
    assert got[0].skipped.examples == [
        f"{tmp_path / 't.parquet'}:6: column 'text': invalid UTF-8 byte 0xff"
    ]


def test_a_truncated_prepared_shard_names_the_file(tmp_path):
    source = _jsonl(tmp_path / "in.jsonl", _docs_in("train", 40))
    prepare.prepare(source, str(tmp_path / "out"))
    shard = sources.prepared_shards(str(tmp_path / "out"), "train")[0]
    faults.truncate(shard)
    with pytest.raises(DataError, match=f"{shard}: this prepared shard cannot be read.*prepare"):
        sources.load_documents(
            sources.SourceSpec("prepared", str(tmp_path / "out")), "train", "byte", "text"
        )


def test_prepare_names_a_corrupt_gzip_and_writes_nothing(tmp_path):
    text = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(2000)).encode()
    path = faults.corrupt_gzip(tmp_path / "bad.jsonl.gz", text)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"{path}: cannot read it as jsonl after line \d+ \(zlib"):
        prepare.prepare(path, str(out))
    assert os.listdir(tmp_path) == ["bad.jsonl.gz"]


def test_prepare_refuses_to_write_an_empty_dataset(tmp_path):
    path = faults.write_lines(tmp_path / "bad.jsonl", [b'{"text": "a \xff"}', "{", '{"body": "x"}'])
    with pytest.raises(DataError) as refused:
        prepare.prepare(path, str(tmp_path / "out"))
    message = str(refused.value)
    assert "nothing was kept: 3 records read" in message
    assert "malformed 1, invalid_utf8 1, missing_field 1" in message and f"{path}:1" in message
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # no output, no temporary directory


def test_prepare_cli_gives_one_error_line_for_a_corrupt_input(tmp_path):
    text = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(2000)).encode()
    path = faults.corrupt_gzip(tmp_path / "bad.jsonl.gz", text)
    proc = subprocess.run(
        [sys.executable, "-m", "jtrain.data.prepare", f"--input={path}", f"--output={tmp_path}/o"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("prepare: error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and path in errors[0], proc.stderr[-2000:]


def _hf_model(path) -> str:
    """A Hugging Face directory holding the tiny recipe's model (config.json, safetensors)."""
    from flax import nnx

    from jtrain import models
    from jtrain.interop import hf

    config = tiny_config()
    model = models.family_of(config.model).make(config.model, head="logits", rngs=nnx.Rngs(0))
    hf.save_model(model, str(path), max_position_embeddings=64)
    return str(path)


def test_a_truncated_safetensors_file_names_the_file_and_the_tensor(tmp_path):
    tensors = [(name, (64, 16), lambda: np.ones((64, 16), np.float32)) for name in ("a", "b")]
    safetensors_io.write_shards(str(tmp_path), tensors, np.dtype(np.float32), 1 << 30)
    weights = str(tmp_path / "model.safetensors")
    faults.truncate(weights, 0.9)
    with pytest.raises(DataError, match=f"{weights}: tensor b ends at byte .* looks truncated"):
        safetensors_io.map_checkpoint(str(tmp_path))


def test_a_truncated_hugging_face_model_is_one_error_line(tmp_path):
    weights = os.path.join(_hf_model(tmp_path / "model"), "model.safetensors")
    faults.truncate(weights)
    line = faults.run_failing(
        tmp_path / "run", *faults.ARGS, f"--config.model.init_from=hf:{tmp_path / 'model'}"
    )
    assert f"{weights}: tensor" in line and "looks truncated" in line


def test_broken_hugging_face_directories_are_config_errors_naming_the_file(tmp_path):
    path = _hf_model(tmp_path / "model")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(config_lib.ConfigError, match="has no weights .*model.safetensors"):
        config_lib.prepare(tiny_config(model__init_from=f"hf:{path}"))
    with open(os.path.join(path, "config.json"), "a") as f:
        f.write("}")  # one brace too many
    broken = r"config.json is not valid JSON \(Extra data at line"
    with pytest.raises(config_lib.ConfigError, match=broken):
        config_lib.prepare(tiny_config(model__init_from=f"hf:{path}"))
