"""Token-id documents of one split, by index, with their lengths.

Pipelines only need `lengths`, `doc(i)` and `take(start, size)`; where the ids live (one
in-memory stream, ArrayRecord shards, several sets in a row) is each subclass's concern.
Weighted documents (SFT examples) also give each token's loss weight with `doc_weights(i)`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import numpy as np

from jtrain.errors import DataError


class Documents:
    """Token-id documents of one split (each BOS ... EOS), by index; subclasses supply doc()."""

    lengths: np.ndarray  # int64[n]: tokens per document
    weighted: bool = False  # True: doc_weights(i) gives a loss weight per token

    def __len__(self) -> int:
        return int(self.lengths.size)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """int64[n + 1]: where each document starts in the concatenation of all of them."""
        offsets = np.zeros(self.lengths.size + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return offsets

    @property
    def num_tokens(self) -> int:
        """Tokens in all documents."""
        return int(self.offsets[-1])

    def doc(self, index: int) -> np.ndarray:
        """Returns document `index` as int32 token ids."""
        raise NotImplementedError

    def doc_weights(self, index: int) -> np.ndarray:
        """Returns document `index`'s per-token loss weights (1 = predict this token)."""
        raise NotImplementedError(f"{type(self).__name__} has no loss weights")

    def take(self, start: int, size: int) -> np.ndarray:
        """Returns tokens [start, start + size) of the concatenation (fewer at its end)."""
        pieces, index = [], int(np.searchsorted(self.offsets, start, side="right")) - 1
        while size > 0 and index < len(self):
            piece = self.doc(index)[start - self.offsets[index] :][:size]
            pieces.append(piece)
            start, size, index = start + piece.size, size - piece.size, index + 1
        return np.concatenate(pieces) if pieces else np.zeros((0,), dtype=np.int32)


class InMemoryDocuments(Documents):
    """Documents held as one int32 stream (the embedded corpus, files tokenized on the fly)."""

    def __init__(self, docs: Sequence[np.ndarray]):
        self.lengths = np.array([d.size for d in docs], dtype=np.int64)
        stream = np.concatenate(docs) if docs else np.zeros((0,), dtype=np.int32)
        self.stream = stream.astype(np.int32, copy=False)
        self.stream.setflags(write=False)  # shared by every pipeline in the process

    def doc(self, index: int) -> np.ndarray:
        return self.stream[self.offsets[index] : self.offsets[index + 1]]

    def take(self, start: int, size: int) -> np.ndarray:
        return self.stream[start : start + size]


class WeightedDocuments(InMemoryDocuments):
    """In-memory documents with a loss weight per token (0/1 uint8), e.g. SFT examples."""

    weighted = True

    def __init__(self, docs: Sequence[np.ndarray], weights: Sequence[np.ndarray]):
        super().__init__(docs)
        if [w.size for w in weights] != self.lengths.tolist():
            raise ValueError("every document needs exactly one weight per token")
        flat = np.concatenate(weights) if weights else np.zeros((0,), dtype=np.uint8)
        self.weights = flat.astype(np.uint8, copy=False)
        self.weights.setflags(write=False)

    def doc_weights(self, index: int) -> np.ndarray:
        return self.weights[self.offsets[index] : self.offsets[index + 1]]


class ArrayRecordDocuments(Documents):
    """Documents of a prepared split: one ArrayRecord record of little-endian int32 each.

    Packing plans need every length up front, so the constructor reads each record once (a
    damaged shard is a DataError naming it, before training rather than mid-run); the reader
    reopens lazily in every worker process, and the last few documents are cached
    (consecutive chunks of a long document read it once).
    """

    _CACHED_DOCS = 8

    def __init__(self, paths: Sequence[str]):
        self.paths = tuple(paths)
        self._source, self._cache, self._lock = None, {}, threading.Lock()
        lengths = [_shard_lengths(path) for path in self.paths]
        self.lengths = np.concatenate(lengths or [np.zeros(0, np.int64)])
        self._shard_ends = np.cumsum([len(shard) for shard in lengths], dtype=np.int64)

    def _reader(self):
        if self._source is None:
            import grain  # here, so that tokenizers and sources import without Grain

            self._source = (
                grain.sources.ArrayRecordDataSource(list(self.paths)) if self.paths else []
            )
        return self._source

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None, "_cache": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def doc(self, index: int) -> np.ndarray:
        with self._lock:  # a prefetch thread and the caller may read at once
            if index not in self._cache:
                if len(self._cache) >= self._CACHED_DOCS:
                    del self._cache[next(iter(self._cache))]
                self._cache[index] = np.frombuffer(self._record(index), dtype="<i4")
            return self._cache[index]

    def _record(self, index: int) -> bytes:
        try:
            return self._reader()[index]
        except RuntimeError as err:  # the shard changed on disk since its lengths were read
            shard = self.paths[int(np.searchsorted(self._shard_ends, index, side="right"))]
            raise _damaged_shard(shard, err) from None


def _shard_lengths(path: str) -> np.ndarray:
    """int64 tokens of each document of one shard, reading each record once."""
    import grain  # here, so that tokenizers and sources import without Grain

    try:
        source = grain.sources.ArrayRecordDataSource([path])
        return np.fromiter((len(source[i]) // 4 for i in range(len(source))), dtype=np.int64)
    except RuntimeError as err:  # array_record's error for a damaged file names no file
        raise _damaged_shard(path, err) from None


def _damaged_shard(path: str, err: Exception) -> DataError:
    """The error for a prepared shard that cannot be read."""
    return DataError(
        f"{path}: this prepared shard cannot be read ({err}); it looks truncated or corrupt. "
        "Run `python -m jtrain.data.prepare` again to rewrite the dataset."
    )


class ConcatDocuments(Documents):
    """Several document sets as one, in the given order."""

    def __init__(self, parts: Sequence[Documents]):
        self.parts = tuple(parts)
        self.lengths = np.concatenate([p.lengths for p in parts] or [np.zeros(0, np.int64)])
        self._firsts = np.cumsum([0] + [len(p) for p in parts])
        self.weighted = bool(parts) and all(p.weighted for p in parts)

    def _part(self, index: int) -> tuple[Documents, int]:
        part = int(np.searchsorted(self._firsts, index, side="right")) - 1
        return self.parts[part], index - int(self._firsts[part])

    def doc(self, index: int) -> np.ndarray:
        part, index = self._part(index)
        return part.doc(index)

    def doc_weights(self, index: int) -> np.ndarray:
        part, index = self._part(index)
        return part.doc_weights(index)
