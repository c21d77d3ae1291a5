"""Where `jtrain.data.prepare` writes: shards of one split, and the finished output directory.

A split's documents go to ArrayRecord shards of `shard_docs` documents, named i-of-n once the
split is complete. The whole output is built under a temporary directory and moved into
place only when everything succeeded and the train split has documents, so an output
directory that exists is complete and can be trained on.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from jtrain.errors import DataError


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


def check_usable(manifest: dict) -> None:
    """Raises DataError for an output nothing could train on (nothing kept, or nothing in the
    train split), saying where the documents went."""
    counts, config, splits = manifest["documents"], manifest["config"], manifest["splits"]
    if not counts["kept"]:
        dropped = ", ".join(
            f"{kind} {n:,}" for kind, n in counts.items() if n and kind not in ("read", "kept")
        )
        examples = [quoted[0] for quoted in manifest["examples"].values()]
        raise DataError(
            f"nothing was kept: {counts['read']:,} records read from {config['files']} file(s)"
            + (f", dropped as {dropped} (e.g. {examples[0]})" if dropped else "")
            + f"; check --text_field={config['text_field']!r}, --format, --text_mode and the "
            "inputs. Nothing was written."
        )
    if not splits["train"]["documents"]:
        shares = ", ".join(f"{name} {split['documents']:,}" for name, split in splits.items())
        raise DataError(
            f"the train split is empty: the {counts['kept']:,} documents kept went to the "
            f"others ({shares}; --splits={','.join(f'{x:g}' for x in config['splits'])}); add "
            "documents or give train a larger share of --splits. Nothing was written."
        )


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
