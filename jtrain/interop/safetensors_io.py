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

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
}  # fmt: skip

# A tensor to write: its name, its shape, and a function that gathers it when it is written.
Tensor = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def map_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The tensors of a Hugging Face model directory by name, memory-mapped, never unpickled."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path} has no model.safetensors or model.safetensors.index.json; pickled "
            "(.bin/.pt) checkpoints are not read: convert them to safetensors first."
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(_map_safetensors(os.path.join(path, name)))
    return tensors


def _map_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped views of every tensor in one .safetensors file."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data = np.memmap(path, np.uint8, mode="r", offset=8 + header_len) if header else None
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
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
