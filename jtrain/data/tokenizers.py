"""Tokenizers: text to int32 ids and back.

Every tokenizer exposes the small `Tokenizer` protocol (vocabulary size, PAD/BOS/EOS ids,
`encode`, `decode`), so pipelines never depend on which one a config names. This issue ships
the byte-level tokenizer; Hugging Face and SentencePiece tokenizers plug into `_TOKENIZERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    """What pipelines and sampling need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then PAD=256, BOS=257, EOS=258."""

    vocab_size: int = 259
    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """Returns the int32 ids of `text`, optionally wrapped in BOS ... EOS."""
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        ids = np.empty(body.size + add_bos + add_eos, dtype=np.int32)
        ids[int(add_bos) : int(add_bos) + body.size] = body
        if add_bos:
            ids[0] = self.bos_id
        if add_eos:
            ids[-1] = self.eos_id
        return ids

    def decode(self, ids) -> str:
        """Returns the text of the byte ids in `ids`; specials and unknown ids are dropped."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        data = flat[(flat >= 0) & (flat < 256)].astype(np.uint8)
        # A model can emit byte sequences that are not valid UTF-8; show them as U+FFFD.
        return data.tobytes().decode("utf-8", errors="replace")


_TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {"byte": ByteTokenizer}


def tokenizer_names() -> tuple[str, ...]:
    """Returns the names `get_tokenizer` accepts."""
    return tuple(sorted(_TOKENIZERS))


def get_tokenizer(name: str) -> Tokenizer:
    """Returns the tokenizer registered as `name`."""
    if name not in _TOKENIZERS:
        raise ValueError(f"Unknown tokenizer {name!r}; allowed: {', '.join(tokenizer_names())}.")
    return _TOKENIZERS[name]()
