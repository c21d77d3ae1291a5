"""The resolved config in TensorBoard: a table of every key in the Text tab, and the run's
hyperparameters in the HParams tab, so the runs under one `--logdir` can be compared.

Process 0 writes them to event files of their own in workdir/tensorboard/ beside the scalars
of `metrics.MetricWriter`: `config.out.tfevents.*` before the first step (the table, and the
HParams session start with every scalar leaf of the config) and `config.out.tfevents.*.end`
when the run finishes (the session's end, status success). Each file is written whole and
closed at once, so only the scalars' file stays open while a run trains.

What TensorBoard makes of them (tensorboard/plugins/hparams/backend_context.py):

- The HParams metrics are the scalars of the session's run, each at its last value: the final
  `val/...` and `test/...` (and the last `train/...`). No `experiment` summary is written to
  list them: TensorBoard takes the first one it finds under the --logdir for every run, so one
  run's keys would hide the others'; without one it gathers every run's session.
- A run keeps the first session start and end it holds. A resumed run adds its table at the
  step it resumed from (Text tab: what it ran with), but the HParams tab keeps the values the
  run started with (config_changes.jsonl lists what a resume changed); a run preempted or
  failed has no end (status unknown) until a resumed run finishes it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax

from jtrain import metrics, workdir_guard
from jtrain.hooks import Hook

TAG = "config"  # the Text tab shows the table under "config/text_summary"
FILE_PREFIX = "config"  # sorts before MetricWriter's "events.*", which TensorBoard reads on


def flat_config(config) -> dict[str, Any]:
    """{"optimizer.lr": 0.003, ...}: every leaf of the config as config.json holds it."""
    return workdir_guard.flatten(json.loads(json.dumps(config.to_dict())))


def markdown_table(flat: Mapping[str, Any], *, resumed_at: int | None = None) -> str:
    """The config as a two-column markdown table, values as JSON (strings quoted)."""
    lines = [f"Resumed at step {resumed_at} with:\n"] if resumed_at else []
    lines += ["| key | value |", "| --- | --- |"]
    lines += [f"| {_code(key)} | {_code(json.dumps(value))} |" for key, value in flat.items()]
    return "\n".join(lines)


def _code(text: str) -> str:
    # A code span keeps `mlp.*` or `a_b` from being read as markdown; inside one, the tables
    # extension TensorBoard renders with does not split cells at "|".
    fence, pad = ("``", " ") if "`" in text else ("`", "")
    return f"{fence}{pad}{text}{pad}{fence}"


def _summary_value(tag: str, plugin: str, content: bytes, **fields):
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    data = SummaryMetadata.PluginData(plugin_name=plugin, content=content)
    return Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=data), **fields)


def session_start(flat: Mapping[str, Any]):
    """The HParams plugin's session start info: the scalar leaves (lists and None left out)."""
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionStartInfo

    info = SessionStartInfo(start_time_secs=time.time())
    for key, value in flat.items():
        if isinstance(value, bool):  # before int: True is an int to Python
            info.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[key].number_value = float(value)
        elif isinstance(value, str):
            info.hparams[key].string_value = value
    content = HParamsPluginData(session_start_info=info, version=0).SerializeToString()
    return _summary_value("_hparams_/session_start_info", "hparams", content)


def session_end():
    """The HParams plugin's session end info of a run that finished."""
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo

    info = SessionEndInfo(status=Status.Value("STATUS_SUCCESS"), end_time_secs=time.time())
    content = HParamsPluginData(session_end_info=info, version=0).SerializeToString()
    return _summary_value("_hparams_/session_end_info", "hparams", content)


def text(tag: str, markdown: str):
    """A Text-tab summary value (what tensorboardX's summary.text makes)."""
    from tensorboardX.proto.plugin_text_pb2 import TextPluginData
    from tensorboardX.proto.tensor_pb2 import TensorProto
    from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

    tensor = TensorProto(
        dtype="DT_STRING",
        string_val=[markdown.encode("utf-8")],
        tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
    )
    content = TextPluginData(version=0).SerializeToString()
    return _summary_value(f"{tag}/text_summary", "text", content, tensor=tensor)


def write_events(logdir: str, step: int, values: list, *, suffix: str = "") -> None:
    """Writes `values` (Summary.Value) as one event at `step` to a new event file, closed on
    return."""
    events = metrics.EventFile(logdir, prefix=FILE_PREFIX, suffix=suffix)
    try:
        events.write_values(step, values)
    finally:
        events.close()


class ConfigSummary(Hook):
    """Writes the config table and the HParams session start before the first step, and the
    session end when the run finishes (process 0)."""

    def on_start(self, loop, state, step) -> None:
        if jax.process_index() != 0:
            return
        metrics.import_tensorboardx_without_torch()  # before the protos below import it
        flat = flat_config(loop.config)
        table = text(TAG, markdown_table(flat, resumed_at=step or None))
        write_events(_logdir(loop), step, [table, session_start(flat)])

    def on_end(self, loop, state, *, preempted) -> None:
        if preempted or jax.process_index() != 0:
            return
        metrics.import_tensorboardx_without_torch()
        write_events(_logdir(loop), loop.end_step, [session_end()], suffix=".end")


def _logdir(loop) -> str:
    return os.path.join(loop.workdir, "tensorboard")
