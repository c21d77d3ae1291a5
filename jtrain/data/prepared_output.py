"""Where `jtrain.data.prepare` writes: shards of one split, and the finished output directory.

A split's documents go to ArrayRecord shards of `shard_docs` documents, named i-of-n once the
split is complete. The whole output is built under a temporary directory and moved into
place only when everything succeeded, so an output directory that exists is complete.
"""

from __future__ import annotations

import os
import shutil

import numpy as np


def check_output(output: str, overwrite: bool) -> None:
    if os.path.isdir(output) and not os.listdir(output):
        return
    if os.path.lexists(output) and not overwrite:
        raise FileExistsError(
            f"Output {output!r} already exists and is not empty; pass --overwrite to replace "
            "it, or choose another --output."
        )


def publish(tmp: str, output: str, overwrite: bool) -> None:
    """Moves the finished `tmp` to `output`, replacing an old `output` only after success."""
    check_output(output, overwrite)
    if not os.path.lexists(output):
        os.rename(tmp, output)
        return
    old = f"{output}.old-{os.getpid()}"
    os.rename(output, old)
    os.rename(tmp, output)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


class SplitWriter:
    """Appends token records to one split's shards, `shard_docs` documents a shard."""

    def __init__(self, directory: str, shard_docs: int):
        self.directory, self.shard_docs = directory, shard_docs
        self.documents = self.tokens = 0
        self._paths: list[str] = []
        self._writer = None

    def write(self, ids: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.documents % self.shard_docs == 0:
            self._close_shard()
            path = os.path.join(self.directory, f"shard-{len(self._paths):05d}.partial")
            self._paths.append(path)
            self._writer = ArrayRecordWriter(path, "group_size:1")
        self._writer.write(np.asarray(ids, "<i4").tobytes())
        self.documents += 1
        self.tokens += len(ids)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> int:
        """Closes the last shard, names every shard i-of-n and returns n."""
        self._close_shard()
        n = len(self._paths)
        for i, path in enumerate(self._paths):
            final = os.path.join(self.directory, f"shard-{i:05d}-of-{n:05d}.array_record")
            os.rename(path, final)
        return n
