"""Tokenizers: text to int32 ids and back.

Every tokenizer exposes the small `Tokenizer` protocol (vocabulary size, PAD/BOS/EOS ids,
`encode`, `encode_batch`, `decode`, `describe`), so pipelines never depend on which one a
config names. `get_tokenizer(spec)` takes a built-in name ("byte"), a Hugging Face
`tokenizer.json`, a SentencePiece `*.model`, or a directory holding either (a model directory).

Special tokens behave the same for every kind: `encode` adds BOS/EOS only as its flags say
(never a library's own post-processor), `decode` drops PAD/BOS/EOS and out-of-range ids.
A tokenizer without a BOS token uses EOS as BOS (GPT-2 style); one without a PAD token uses
EOS as PAD. So `pad_id == eos_id` is possible: loss masks must come from positions, not from
comparing targets with `pad_id`, or the model never learns to emit EOS.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Tokenizer(Protocol):
    """What pipelines and sampling need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray: ...

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = True, add_eos: bool = True
    ) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def _describe(tok: Tokenizer, kind: str, path: Path | None, sha256: str | None) -> dict[str, Any]:
    return {
        "type": kind,
        "path": None if path is None else str(path),
        "sha256": sha256,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
    }


def _wrap(body: Sequence[int], tok: Tokenizer, add_bos: bool, add_eos: bool) -> np.ndarray:
    """Returns int32 [BOS] + body + [EOS], each end as its flag says."""
    ids = np.empty(len(body) + add_bos + add_eos, dtype=np.int32)
    ids[int(add_bos) : int(add_bos) + len(body)] = body
    if add_bos:
        ids[0] = tok.bos_id
    if add_eos:
        ids[-1] = tok.eos_id
    return ids


def _plain_ids(ids, tok: Tokenizer) -> list[int]:
    """Returns `ids` flattened, without PAD/BOS/EOS and ids outside the vocabulary."""
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = (flat >= 0) & (flat < tok.vocab_size)
    keep &= ~np.isin(flat, [tok.pad_id, tok.bos_id, tok.eos_id])
    return flat[keep].tolist()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then PAD=256, BOS=257, EOS=258."""

    vocab_size: int = 259
    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """Returns the int32 ids of `text`, optionally wrapped in BOS ... EOS."""
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return _wrap(body, self, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = True, add_eos: bool = True
    ) -> list[np.ndarray]:
        """Returns `encode` of every text."""
        return [self.encode(text, add_bos=add_bos, add_eos=add_eos) for text in texts]

    def decode(self, ids) -> str:
        """Returns the text of the byte ids in `ids`; specials and unknown ids are dropped."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        data = flat[(flat >= 0) & (flat < 256)].astype(np.uint8)
        # A model can emit byte sequences that are not valid UTF-8; show them as U+FFFD.
        return data.tobytes().decode("utf-8", errors="replace")

    def describe(self) -> dict[str, Any]:
        """Returns a JSON-able record of this tokenizer, for manifests and configs."""
        return _describe(self, "byte", None, None)


# Where a model directory names its special tokens, in order of precedence.
_SPECIALS_FILES = ("tokenizer_config.json", "special_tokens_map.json")
# Tried in order when no config file names a role's token.
_COMMON_TOKENS = {
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[EOS]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
}


def _configured_tokens(directory: Path) -> dict[str, tuple[str, Path]]:
    """Returns {role: (token, file)} for the BOS/EOS/PAD tokens that config files name."""
    found: dict[str, tuple[str, Path]] = {}
    for name in _SPECIALS_FILES:
        file = directory / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"Cannot read tokenizer config {file}: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"Tokenizer config {file} is not a JSON object.")
        for role in _COMMON_TOKENS:
            token = config.get(f"{role}_token")
            if isinstance(token, dict):  # {"__type": "AddedToken", "content": "<s>", ...}
                token = token.get("content")
            if isinstance(token, str) and token and role not in found:
                found[role] = (token, file)
    return found


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizer.json`, with special tokens from `tokenizer_config.json`.

    Each of BOS/EOS/PAD comes from `tokenizer_config.json` (or `special_tokens_map.json`)
    beside the file when one names it, else from the first common token in the vocabulary
    (`<s>`, `</s>`, `<|endoftext|>`, `<pad>`, ...). No BOS -> EOS; no PAD -> EOS.
    As in `transformers`, added tokens written literally in the text (`<|im_start|>` in a
    rendered chat template) encode to their ids.
    """

    def __init__(self, path: str | Path):
        import tokenizers  # the library, not this module: imported lazily to keep this light

        self.path = Path(path).resolve()
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust loader raises a bare Exception
            raise ValueError(f"Cannot load Hugging Face tokenizer {self.path}: {e}") from e
        # A saved tokenizer.json may pad or truncate; ids must be the text's and nothing else.
        self._tok.no_padding()
        self._tok.no_truncation()
        self._sha256 = _sha256(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = self._special_ids()
        if ids["eos"] is None:
            raise ValueError(
                f"Hugging Face tokenizer {self.path} has no EOS token: name one as eos_token "
                f"in {self.path.parent / 'tokenizer_config.json'}."
            )
        self.eos_id = ids["eos"]
        self.bos_id = self.eos_id if ids["bos"] is None else ids["bos"]
        self.pad_id = self.eos_id if ids["pad"] is None else ids["pad"]

    def _special_ids(self) -> dict[str, int | None]:
        configured = _configured_tokens(self.path.parent)
        ids: dict[str, int | None] = {}
        for role, common in _COMMON_TOKENS.items():
            if role in configured:
                token, file = configured[role]
                ids[role] = self._tok.token_to_id(token)
                if ids[role] is None:
                    raise ValueError(
                        f"{file} names {role}_token={token!r}, which is not in the vocabulary "
                        f"of {self.path}."
                    )
            else:
                found = (self._tok.token_to_id(token) for token in common)
                ids[role] = next((i for i in found if i is not None), None)
        return ids

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """Returns the int32 ids of `text`, optionally wrapped in BOS ... EOS."""
        body = self._tok.encode(text, add_special_tokens=False).ids
        return _wrap(body, self, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = True, add_eos: bool = True
    ) -> list[np.ndarray]:
        """Returns `encode` of every text, tokenized on all cores by the Rust library."""
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets, which we never use.
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = batch(list(texts), add_special_tokens=False)
        return [_wrap(e.ids, self, add_bos, add_eos) for e in encodings]

    def decode(self, ids) -> str:
        """Returns the text of `ids`; PAD/BOS/EOS, other special tokens and unknown ids dropped."""
        return self._tok.decode(_plain_ids(ids, self), skip_special_tokens=True)

    def describe(self) -> dict[str, Any]:
        """Returns a JSON-able record of this tokenizer, for manifests and configs."""
        return _describe(self, "huggingface", self.path, self._sha256)

    def __reduce__(self):
        # Pickles (e.g. to Grain worker processes) as its path, reloaded on the other side.
        return (type(self), (str(self.path),))


class SentencePieceTokenizer:
    """A SentencePiece `.model` file; BOS/EOS/PAD are the model's, with EOS for a missing one."""

    def __init__(self, path: str | Path):
        import sentencepiece

        self.path = Path(path).resolve()
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:
            raise ValueError(f"Cannot load SentencePiece model {self.path}: {e}") from e
        self._sha256 = _sha256(self.path)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(
                f"SentencePiece model {self.path} has no EOS id; train it with eos_id >= 0."
            )
        # -1 means the model has no such piece.
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        """Returns the int32 ids of `text`, optionally wrapped in BOS ... EOS."""
        body = self._sp.encode(text, out_type=int, add_bos=False, add_eos=False)
        return _wrap(body, self, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = True, add_eos: bool = True
    ) -> list[np.ndarray]:
        """Returns `encode` of every text, tokenized on all cores by the C++ library."""
        bodies = self._sp.encode(list(texts), out_type=int, add_bos=False, add_eos=False)
        return [_wrap(body, self, add_bos, add_eos) for body in bodies]

    def decode(self, ids) -> str:
        """Returns the text of `ids`; PAD/BOS/EOS, control pieces and unknown ids dropped."""
        return self._sp.decode(_plain_ids(ids, self))

    def describe(self) -> dict[str, Any]:
        """Returns a JSON-able record of this tokenizer, for manifests and configs."""
        return _describe(self, "sentencepiece", self.path, self._sha256)

    def __reduce__(self):
        return (type(self), (str(self.path),))


_TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {"byte": ByteTokenizer}
_ACCEPTED = (
    "allowed: {names}, a Hugging Face tokenizer.json, a SentencePiece *.model, "
    "or a directory holding tokenizer.json or tokenizer.model"
)
# A model directory's tokenizer files, in order of preference.
_DIRECTORY_FILES = ("tokenizer.json", "tokenizer.model")


def tokenizer_names() -> tuple[str, ...]:
    """Returns the built-in names `get_tokenizer` accepts (it also accepts paths)."""
    return tuple(sorted(_TOKENIZERS))


def _accepted() -> str:
    return _ACCEPTED.format(names=", ".join(tokenizer_names()))


def _tokenizer_file(directory: Path) -> Path:
    for name in _DIRECTORY_FILES:
        if (directory / name).is_file():
            return directory / name
    raise ValueError(
        f"Directory {directory} holds no tokenizer ({' or '.join(_DIRECTORY_FILES)}); "
        f"{_accepted()}."
    )


def local_path(spec: str | os.PathLike) -> str:
    """The file or directory a tokenizer spec that is not a built-in name names: a path, or an
    `hf:` model's directory (`hf:org/name@COMMIT`: the Hub cache's snapshot, wherever the cache
    is, so a config that names it means the same tokenizer on every machine)."""
    from jtrain import pretrained  # the model specs' module; it imports no tokenizer

    spec = str(spec)
    return pretrained.hf_path(spec) if pretrained.is_hf(spec) else os.path.expanduser(spec)


@functools.lru_cache(maxsize=64)
def get_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Returns the tokenizer that `spec` names (built-in name, path or hf: model), cached per
    spec."""
    if spec in _TOKENIZERS:
        return _TOKENIZERS[spec]()
    named = isinstance(spec, (str, os.PathLike)) and str(spec)
    path = Path(local_path(spec)) if named else None
    if path is None or not path.exists():
        raise ValueError(
            f"Unknown tokenizer {spec!r}: not a built-in name nor an existing path; {_accepted()}."
        )
    if path.is_dir():
        path = _tokenizer_file(path)
    if path.suffix == ".json":
        return HuggingFaceTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"Tokenizer file {path} is neither .json nor .model; {_accepted()}.")
