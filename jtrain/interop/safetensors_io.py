"""Safetensors files of a Hugging Face model directory, read and written with numpy alone.

Reading parses each file's JSON header and memory-maps its data (no pickle, no torch): numpy's
safetensors backend cannot hold bfloat16, the dtype of nearly every released checkpoint, and a
memory map reads only the pages of the slice each device needs. Writing produces
model.safetensors, or numbered shards and their model.safetensors.index.json, gathering one
tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np

from jtrain.errors import DataError

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
}  # fmt: skip

# A tensor to write: its name, its shape, and a function that gathers it when it is written.
Tensor = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


class MissingWeightsError(DataError, FileNotFoundError):
    """A model directory without safetensors weights."""


_INDEX, _SINGLE = "model.safetensors.index.json", "model.safetensors"


def weight_files(path: str) -> list[str]:
    """The safetensors files of a Hugging Face model directory (an index's shards, or
    model.safetensors); a DataError says which is missing or unreadable."""
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(
                f"{index} is not a safetensors index (a JSON object with a weight_map of tensor "
                f"names to files): {type(err).__name__}: {err}; download it again."
            ) from None
        missing = [name for name in files if not os.path.isfile(os.path.join(path, name))]
        if missing:
            raise DataError(
                f"{index} names {len(missing)} file(s) the directory does not have, e.g. "
                f"{missing[0]}: the download looks incomplete; download the model again."
            )
        return files
    if os.path.exists(os.path.join(path, _SINGLE)):
        return [_SINGLE]
    raise MissingWeightsError(
        f"{path} has no weights ({_SINGLE} or {_INDEX}); pickled (.bin/.pt) checkpoints are "
        "not read: convert them to safetensors first."
    )


def map_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The tensors of a Hugging Face model directory by name, memory-mapped, never unpickled."""
    tensors: dict[str, np.ndarray] = {}
    for name in weight_files(path):
        tensors.update(_map_safetensors(os.path.join(path, name)))
    return tensors


def _read_header(path: str) -> tuple[dict, int]:
    """(the JSON header, where the data starts) of a .safetensors file; DataError if damaged."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + header_len > size:
            raise DataError(
                f"{path} ({size:,} bytes) ends inside its header: it looks truncated; "
                "download it again."
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as err:
            raise DataError(
                f"{path}: the header is not valid JSON ({err}); the file is not safetensors "
                "or is corrupt; download it again."
            ) from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: the header is not a JSON object; download the file again.")
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _map_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped views of every tensor in one .safetensors file; a DataError names the
    file and the tensor when the file is truncated or its header inconsistent."""
    header, start = _read_header(path)
    size = os.path.getsize(path) - start
    empty = np.zeros(0, np.uint8)  # np.memmap cannot map zero bytes
    data = np.memmap(path, np.uint8, mode="r", offset=start) if header and size else empty
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise DataError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        if end > size:
            raise DataError(
                f"{path}: tensor {name} ends at byte {start + end:,} but the file has "
                f"{start + size:,}: the file looks truncated; download it again."
            )
        if end - begin != math.prod(info["shape"]) * dtype.itemsize or begin < 0:
            raise DataError(
                f"{path}: tensor {name} holds bytes {begin}..{end}, not the "
                f"{math.prod(info['shape']) * dtype.itemsize} its shape {info['shape']} and "
                f"dtype {info['dtype']} need: the file is corrupt; download it again."
            )
        tensors[name] = data[begin:end].view(dtype).reshape(info["shape"])
    return tensors


def _write_safetensors(path: str, tensors: Sequence[Tensor], dtype: np.dtype) -> None:
    """Writes one safetensors file, gathering one tensor at a time (memory stays bounded)."""
    st_dtype = {v: k for k, v in _ST_DTYPES.items()}[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": st_dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, _, make in tensors:
            f.write(np.ascontiguousarray(make()).reshape(-1).view(np.uint8).data)


def write_shards(
    path: str, tensors: Sequence[Tensor], dtype: np.dtype, max_shard_bytes: int
) -> None:
    """model.safetensors, or numbered shards of at most max_shard_bytes and their index."""
    shards, size = [[]], 0
    for tensor in tensors:
        nbytes = math.prod(tensor[1]) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    if len(shards) == 1:
        _write_safetensors(os.path.join(path, "model.safetensors"), shards[0], dtype)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(path, name), shard, dtype)
        weight_map.update({tensor[0]: name for tensor in shard})
    total = sum(math.prod(t[1]) for t in tensors) * dtype.itemsize
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
