"""The config in TensorBoard (Text and HParams tabs), profiler traces and the Weights & Biases
sink, checked on one tiny run and its resume (wandb itself is replaced by a recording fake)."""

import contextlib
import glob
import gzip
import io
import json
import os
import re
import sys
import types

import jax
import pytest
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from jtrain import metrics, profiling, tb_config, wandb_sink
from jtrain.extras import MissingExtraError
from jtrain.run import train_and_evaluate
from tests.conftest import read_tfrecords, tiny_config

PROJECT = "jtrain-tests"

# A stand-in for the wandb package: records what it is asked, in order.
FAKE_WANDB = """
calls = []
runs = []


class Run:
    def __init__(self, run_id):
        self.id = run_id

    def define_metric(self, name, **kwargs):
        calls.append(("define_metric", name, kwargs))

    def log(self, data):
        calls.append(("log", dict(data)))

    def finish(self, exit_code=None):
        calls.append(("finish", exit_code))


def init(**kwargs):
    calls.append(("init", kwargs))
    runs.append(Run(kwargs.get("id") or "fake-run-%d" % len(runs)))
    return runs[-1]
"""


def _config(steps: int):
    return tiny_config(
        train__steps=steps,
        eval__every_steps=0,
        checkpoint__every_steps=0,
        profile__start_step=3,
        profile__steps=2,
        metrics__wandb_project=PROJECT,
    )


@pytest.fixture(scope="module")
def fake_wandb(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_wandb")
    (root / "wandb").mkdir()
    (root / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        patch.delitem(sys.modules, "wandb", raising=False)
        import wandb

        yield wandb
        patch.delitem(sys.modules, "wandb", raising=False)  # no later test meets the fake


@pytest.fixture(scope="module")
def run(tmp_path_factory, fake_wandb):
    """A 6-step run with W&B on and steps 3..4 profiled: (workdir, its stdout, the fake's
    calls). What a resume does is checked on its workdir piece by piece: a resumed run's
    restore alone compiles for longer than this run."""
    workdir = str(tmp_path_factory.mktemp("run"))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train_and_evaluate(_config(6), workdir)
    return workdir, out.getvalue(), list(fake_wandb.calls)


def _config_events(workdir):
    """(step, {tag: Summary.Value}) of every event in tensorboard/config.out.tfevents.*."""
    events = []
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "config.out.tfevents.*"))):
        for record in read_tfrecords(path):
            event = event_pb2.Event.FromString(record)
            if event.HasField("summary"):
                events.append((event.step, {v.tag: v for v in event.summary.value}))
    return events


def _hparams(value):
    assert value.metadata.plugin_data.plugin_name == "hparams"
    return plugin_hparams_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)


def test_config_table_and_hparams_in_tensorboard(run):
    workdir, _, _ = run
    events = _config_events(workdir)
    starts = [(s, v) for s, v in events if "_hparams_/session_start_info" in v]
    ends = [(s, v) for s, v in events if "_hparams_/session_end_info" in v]
    assert [s for s, _ in starts] == [0] and [s for s, _ in ends] == [6]
    # No experiment summary: TensorBoard would show its keys alone for every run of a logdir.
    assert not any("_hparams_/experiment" in v for _, v in events)

    text = starts[0][1]["config/text_summary"]
    assert text.metadata.plugin_data.plugin_name == "text"
    table = text.tensor.string_val[0].decode()
    assert table.startswith("| key | value |\n| --- | --- |\n")
    assert "| `optimizer.lr` | `0.003` |" in table
    assert '| `optimizer.name` | `"adamw"` |' in table
    assert "| `train.steps` | `6` |" in table

    hparams = _hparams(starts[0][1]["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["optimizer.lr"].number_value == 0.003
    assert hparams["train.batch_size"].number_value == 16
    assert hparams["model.d_model"].number_value == 64
    assert hparams["optimizer.name"].string_value == "adamw"
    assert hparams["model.tie_embeddings"].WhichOneof("kind") == "bool_value"
    assert hparams["metrics.wandb_project"].string_value == PROJECT
    end = _hparams(ends[0][1]["_hparams_/session_end_info"]).session_end_info
    assert end.status == 1  # STATUS_SUCCESS
    # The HParams metrics are the run's scalars at their last value: the final val and test.
    assert {"val", "test"} <= {e["split"] for e in metrics.read_metrics(workdir)}


def test_a_resumed_run_adds_its_table_at_its_step(tmp_path):
    loop = types.SimpleNamespace(config=_config(8), workdir=str(tmp_path))
    tb_config.ConfigSummary().on_start(loop, None, 6)
    ((step, values),) = _config_events(str(tmp_path))
    table = values["config/text_summary"].tensor.string_val[0].decode()
    assert step == 6 and table.startswith("Resumed at step 6 with:")
    assert "| `train.steps` | `8` |" in table
    assert "_hparams_/session_start_info" in values  # TensorBoard keeps the run's first


def test_profile_traces_the_window(run):
    workdir, stdout, _ = run
    profiles = os.path.join(workdir, "tensorboard", "plugins", "profile")
    traces = glob.glob(os.path.join(profiles, "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert f"jtrain: profiled steps 3..4 into {profiles}" in stdout
    # Two steps, no more: the host launches the compiled step once per step. (The JSON copy of
    # the trace, where this JAX writes one, names it; the event's name is the runtime's own.)
    for path in glob.glob(os.path.join(profiles, "*", "*.trace.json.gz")):
        with gzip.open(path) as f:
            names = [e.get("name", "") for e in json.load(f)["traceEvents"]]
        launches = [n for n in names if re.fullmatch(r"\S*Execute \(jit_train_step\)", n)]
        assert len(launches) == 2, launches


def test_wandb_logs_every_event_at_its_step(run):
    workdir, _, calls = run
    (kind, init), *rest = calls
    assert kind == "init" and "id" not in init and "resume" not in init
    assert init["project"] == PROJECT and init["entity"] is None and init["dir"] == workdir
    assert init["config"]["train"]["steps"] == 6 and init["config"]["optimizer"]["lr"] == 0.003
    assert rest[:2] == [
        ("define_metric", "step", {}),
        ("define_metric", "*", {"step_metric": "step"}),
    ]
    assert calls[-1] == ("finish", 0)
    # Every event of metrics.jsonl as split/metric at its step, in order.
    logged = [call[1] for call in calls if call[0] == "log"]
    expected = [
        {
            "step": e["step"],
            **{f"{e['split']}/{k}": v for k, v in e.items() if k not in ("step", "split")},
        }
        for e in metrics.read_metrics(workdir)
    ]
    assert logged == expected and {"val/loss", "test/loss", "train/loss"} <= set().union(*logged)


def test_a_resumed_run_continues_the_same_wandb_run(run, fake_wandb):
    workdir, _, _ = run
    run_id = fake_wandb.runs[0].id  # the W&B run the tiny run made
    assert wandb_sink._saved_id(os.path.join(workdir, wandb_sink.RUN_FILE)) == run_id
    inits = []
    for first_step in (6, 0):  # as _train makes them: resumed after step 6; from scratch
        before = len(fake_wandb.calls)
        (sink,) = wandb_sink.sinks(_config(8), workdir, first_step)
        sink.close()
        inits.append(fake_wandb.calls[before][1])
    resumed, restarted = inits
    assert resumed["id"] == run_id and resumed["resume"] == "allow"
    assert resumed["config"]["train"]["steps"] == 8
    assert "id" not in restarted and "resume" not in restarted  # a new W&B run


def test_a_resumed_run_past_the_window_is_not_profiled(capsys):
    hook = profiling.Profile(start=3, steps=2, last=8)
    hook.on_start(types.SimpleNamespace(workdir="unused"), None, 6)
    out = capsys.readouterr().out
    assert "not profiling: this run resumed after step 6, past profile.start_step=3" in out
    assert not any(hook.due(s, last=s == 8, preempted=False) for s in range(7, 9))


def test_wandb_only_on_process_0(fake_wandb, tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    before = len(fake_wandb.calls)
    sinks = wandb_sink.sinks(_config(6), str(tmp_path), 0)
    with metrics.MetricWriter(str(tmp_path), sinks=sinks, log_to_stdout=False) as writer:
        writer.write(1, "train", {"loss": 1.0})
    assert sinks == [] and len(fake_wandb.calls) == before
    assert os.listdir(tmp_path) == []


def test_missing_wandb_fails_at_once_and_off_never_imports_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    workdir = tmp_path / "run"
    with pytest.raises(MissingExtraError, match=r'pip install "jtrain\[wandb\]"') as err:
        train_and_evaluate(_config(6), str(workdir))
    assert "metrics.wandb_project='jtrain-tests'" in str(err.value)
    assert "\n" not in str(err.value)
    assert not workdir.exists()  # before the workdir is touched, let alone a compile
    off = tiny_config()
    wandb_sink.check(off)  # imports nothing: it would raise
    assert wandb_sink.sinks(off, str(tmp_path), 0) == []


def test_a_failed_run_stops_its_trace(tmp_path, capsys):
    hook = profiling.Profile(start=1, steps=5, last=10)
    hook.on_start(types.SimpleNamespace(workdir=str(tmp_path)), None, 0)  # starts: step 1
    with pytest.raises(RuntimeError, match="boom"):
        with profiling.stopped_on_exit([hook]):
            raise RuntimeError("boom")
    assert glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert "profiled the steps before the run ended" in capsys.readouterr().out
    jax.profiler.start_trace(str(tmp_path / "again"))  # the profiler is free again
    jax.profiler.stop_trace()


def test_a_window_after_the_last_step_is_skipped(capsys):
    hook = profiling.Profile(start=50, steps=2, last=20)
    hook.on_start(types.SimpleNamespace(workdir="unused"), None, 0)
    assert "not profiling: profile.start_step=50 is after train.steps=20" in capsys.readouterr().out
    assert not any(hook.due(s, last=s == 20, preempted=False) for s in range(1, 21))
    assert profiling.hooks(tiny_config()) == []  # profile.steps = 0: off


def test_markdown_cells_keep_pipes_and_backticks():
    table = tb_config.markdown_table({"a.b": "x|y", "c": "`q`", "d": [1, 2]})
    assert table.splitlines()[2:] == [
        '| `a.b` | `"x|y"` |',
        '| `c` | `` "`q`" `` |',
        "| `d` | `[1, 2]` |",
    ]
