"""OpenAI's response shapes: completions, chat completions, and their server-sent event streams.

A stream is written while its request's batch decodes: the worker hands over each new piece of
text as its tokens are sampled (`TextStream` turns tokens into text incrementally, holding back
a token that ends inside a character), and `Responder` wraps the pieces in OpenAI's chunks,
sent as `data: {chunk}` events ending with `data: [DONE]`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterable

import numpy as np
from absl import logging


@dataclasses.dataclass(frozen=True)
class Answer:
    """A finished request: its tokens (no stop token) and text, why it ended, and the token
    counts for `usage`."""

    ids: np.ndarray
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        """OpenAI's usage object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class TextStream:
    """Token ids in, as they come; text pieces out that join to `tokenizer.decode(ids)`.

    Each token is decoded with the few before it (as text-generation-inference does), so word
    boundaries that depend on context come out right and the cost stays linear; a token that
    ends inside a character waits for the tokens that complete it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""  # the text handed out so far
        self._prefix = self._read = 0  # ids[prefix:read] is the context already sent

    def push(self, ids: Iterable[int]) -> list[str]:
        """The pieces of text that `ids`, appended, complete (none for an unfinished char)."""
        pieces = []
        for token in ids:
            self.ids.append(int(token))
            context = self.ids[self._prefix : self._read]
            before = self.tokenizer.decode(context)
            now = self.tokenizer.decode(self.ids[self._prefix :])
            if len(now) > len(before) and not now.endswith("\ufffd"):
                pieces.append(now[len(before) :])
                self._prefix, self._read = self._read, len(self.ids)
        self.sent += "".join(pieces)
        return pieces

    def finish(self, text: str) -> str:
        """The rest of `text` (the decode of every id) after what was sent: held-back bytes
        that never completed a character, or what the tokenizer's whole decode adds."""
        if not text.startswith(self.sent):
            # A tokenizer whose decode rewrites earlier text (e.g. spaces cleaned up before
            # punctuation): what was sent cannot be taken back.
            logging.warning("a stream's pieces %r differ from the text %r", self.sent, text)
            return ""
        rest, self.sent = text[len(self.sent) :], text
        return rest


class Responder:
    """Writes one request's response bodies; `kind` is "completion" or "chat"."""

    def __init__(self, kind: str, model: str, *, include_usage: bool = False):
        self.kind, self.model, self.include_usage = kind, model, include_usage
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def body(self, answer: Answer) -> dict:
        """The whole response: one choice and the usage."""
        if self.kind == "chat":
            message = {"role": "assistant", "content": answer.text}
            choice = {"index": 0, "message": message, "logprobs": None}
            obj = "chat.completion"
        else:
            choice, obj = {"index": 0, "text": answer.text, "logprobs": None}, "text_completion"
        choice["finish_reason"] = answer.finish_reason
        return {**self._envelope(obj, [choice]), "usage": answer.usage()}

    def opening(self) -> list[dict]:
        """The chunks a stream starts with: chat's assistant role; none for completions."""
        return [self._chunk(None, None, role=True)] if self.kind == "chat" else []

    def piece(self, text: str) -> dict:
        """The chunk of one piece of text."""
        return self._chunk(text, None)

    def closing(self, answer: Answer) -> list[dict]:
        """The chunks a stream ends with: the finish reason, then the usage if asked for."""
        chunks = [self._chunk(None, answer.finish_reason)]
        if self.include_usage:
            chunks.append({**self._envelope(self._chunk_object, []), "usage": answer.usage()})
        return chunks

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def _chunk(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice |= {"logprobs": None, "finish_reason": finish}
        extra = {"usage": None} if self.include_usage else {}
        return {**self._envelope(self._chunk_object, [choice]), **extra}


def event(chunk: dict) -> str:
    """One server-sent event holding `chunk`."""
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"  # the event that ends every stream
