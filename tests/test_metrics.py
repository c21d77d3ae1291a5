"""Tests for jtrain.metrics: exact JSONL round trips, TensorBoard events, peak FLOP/s and MFU."""

import glob
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jtrain import metrics
from tests.conftest import read_tfrecords


def test_jsonl_round_trip_is_exact(tmp_path):
    values = {
        "a": 0.1 + 0.2,
        "third": 1 / 3,
        "tiny": 1e-300,
        "f32": np.float32(0.1),
        "jax": jnp.asarray(2.0, jnp.float32) / 3,
        "count": np.int64(7),
    }
    with metrics.MetricWriter(str(tmp_path), log_to_stdout=False) as writer:
        writer.write(10, "train", values)
        writer.write(20, "val", {"loss": 1.5})
    events = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert len(events) == 2
    first = events[0]
    assert first["step"] == 10 and first["split"] == "train"
    assert first["a"] == 0.1 + 0.2
    assert first["third"] == 1 / 3
    assert first["tiny"] == 1e-300
    assert first["f32"] == float(np.float32(0.1))
    assert first["jax"] == float(jnp.asarray(2.0, jnp.float32) / 3)
    assert first["count"] == 7 and isinstance(first["count"], int)
    assert events[1] == {"step": 20, "split": "val", "loss": 1.5}
    assert metrics.read_metrics(str(tmp_path)) == events  # a workdir works too


def test_non_finite_values_still_round_trip(tmp_path):
    with metrics.MetricWriter(str(tmp_path), log_to_stdout=False) as writer:
        writer.write(1, "train", {"nan": float("nan"), "inf": np.float32("inf"), "ninf": -math.inf})
    (event,) = metrics.read_metrics(str(tmp_path))
    assert math.isnan(event["nan"])
    assert event["inf"] == math.inf and event["ninf"] == -math.inf


def test_lines_are_on_disk_before_close(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), log_to_stdout=False)
    writer.write(1, "train", {"loss": 2.0})
    assert metrics.read_metrics(str(tmp_path)) == [{"step": 1, "split": "train", "loss": 2.0}]
    writer.close()


def test_resume_after_a_truncated_line_appends_cleanly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "spl')
    with metrics.MetricWriter(str(tmp_path), log_to_stdout=False) as writer:
        writer.write(2, "train", {"loss": 1.0})
    events = metrics.read_metrics(str(path))
    assert [e["step"] for e in events] == [1, 2]
    assert events[1]["loss"] == 1.0


def test_bad_metrics_raise(tmp_path):
    with metrics.MetricWriter(str(tmp_path), log_to_stdout=False) as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, "train", {"step": 1.0})
        with pytest.raises(ValueError, match="scalar"):
            writer.write(1, "train", {"loss": np.zeros(3)})


def test_stdout_line(capsys):
    writer = metrics.MetricWriter(None)
    writer.write(
        200,
        "train",
        {"loss": 1.93421, "lr": 2.9e-3, "tokens/s": 12345.6, "mfu": 0.031, "tokens": 4096},
    )
    writer.close()
    line = capsys.readouterr().out.strip()
    assert line == (
        "step   200 | train | loss 1.9342 | lr 2.9e-03 | tokens/s 12,346 | mfu 3.1% | tokens 4,096"
    )


def test_tensorboard_events(tmp_path):
    with metrics.MetricWriter(str(tmp_path), log_to_stdout=False) as writer:
        writer.write(5, "train", {"loss": 0.5})
        writer.write(7, "val", {"loss": 0.25})
    files = glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
    assert len(files) == 1 and os.path.getsize(files[0]) > 0
    scalars = []
    for record in read_tfrecords(files[0]):
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            scalars.append((event.step, value.tag, value.simple_value))
    assert scalars == [(5, "train/loss", 0.5), (7, "val/loss", 0.25)]


def test_writer_without_workdir_writes_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with metrics.MetricWriter(None, log_to_stdout=False) as writer:
        writer.write(1, "train", {"loss": 1.0})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "device_kind, peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
    ],
)
def test_peak_flops_table(device_kind, peak):
    device = types.SimpleNamespace(device_kind=device_kind, platform="tpu")
    assert metrics.device_peak_flops(device) == peak


def test_configured_peak_wins():
    device = types.SimpleNamespace(device_kind="TPU v4", platform="tpu")
    assert metrics.device_peak_flops(device, configured=1e12) == 1e12


def test_unknown_accelerator_is_zero():
    device = types.SimpleNamespace(device_kind="Mystery Chip 9000", platform="gpu")
    assert metrics.device_peak_flops(device) == 0.0


def test_cpu_peak_is_shared_between_fake_devices(monkeypatch):
    monkeypatch.setattr(metrics, "_measured_cpu_flops", lambda: 8e9)
    expected = 8e9 / len(jax.local_devices(backend="cpu"))
    assert metrics.device_peak_flops(jax.local_devices(backend="cpu")[0]) == expected


def test_measure_cpu_flops_is_positive_and_finite():
    flops = metrics.measure_cpu_flops(seconds=0.05)
    assert math.isfinite(flops) and flops > 0


def test_mfu():
    assert metrics.mfu(6e9, 1e4, 8, 1e14) == pytest.approx(6e9 * 1e4 / 8e14)
    assert metrics.mfu(6e9, 1e4, 8, 0.0) == 0.0
    json.dumps(metrics.mfu(1.0, 1.0, 1, 1.0))  # a plain float
