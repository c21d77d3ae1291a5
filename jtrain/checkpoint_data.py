"""Each process's data-iterator position in a checkpoint.

In a multi-process run each process reads its own rows (jtrain.data.pipeline) through an
iterator of its own, but Orbax writes a step's metadata from process 0 alone. So a save
gathers every process's position into it: "data" is process 0's (what a one-process run
saves, and what older checkpoints hold) and "data_per_process" lists them all in process
order. A restore gives each process its own. Today's pipelines put every process at the same
position (the step), so a run may resume on another process count; positions that differ
cannot be split another way, and such a resume is refused.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jtrain.errors import UserError


class DataPositionError(UserError, RuntimeError):
    """The saved data positions cannot be handed to this run's processes."""


def gathered(position: Any) -> dict[str, Any]:
    """{"data": process 0's position[, "data_per_process": every process's]}: a collective,
    so every process calls it at the same save."""
    if jax.process_count() == 1:
        return {"data": position}
    text = np.frombuffer(json.dumps(position).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray(text.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: text.size] = text
    rows = multihost_utils.process_allgather(padded)
    positions = [json.loads(bytes(row[: int(n)])) for row, n in zip(rows, sizes, strict=True)]
    return {"data": positions[0], "data_per_process": positions}


def own(custom: dict, where: str) -> Any:
    """This process's saved position; `where` names the checkpoint in the error."""
    positions = custom.get("data_per_process")
    if positions is None:  # saved by one process
        return custom["data"]
    if len(positions) == jax.process_count():
        return positions[jax.process_index()]
    if all(p == positions[0] for p in positions):
        return positions[0]
    raise DataPositionError(
        f"{where} was saved by {len(positions)} processes whose data positions differ, and "
        f"this run has {jax.process_count()}: resume it with {len(positions)} processes"
    )
