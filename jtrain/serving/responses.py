"""OpenAI's response shapes: completions, chat completions, and their server-sent event streams.

A stream is written after its request's batch has finished (the sampler decodes in one compiled
loop, so tokens cannot leave it one at a time): the completion's text is cut into one chunk per
token that completes a character, and sent as `data: {chunk}` events ending with `data: [DONE]`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator

import numpy as np


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


def text_pieces(tokenizer, ids: np.ndarray) -> list[str]:
    """The text of `ids` in pieces that join to `tokenizer.decode(ids)`: one per token, except
    that a token ending inside a character waits for the tokens that complete it.

    Each token is decoded with the few before it (as text-generation-inference does), so word
    boundaries that depend on context come out right and the cost stays linear.
    """
    full, pieces = tokenizer.decode(ids), []
    prefix, read = 0, 0  # ids[prefix:read] is the context already sent
    for end in range(1, len(ids) + 1):
        before, now = tokenizer.decode(ids[prefix:read]), tokenizer.decode(ids[prefix:end])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            pieces.append(now[len(before) :])
            prefix, read = read, end
    sent = "".join(pieces)
    if not full.startswith(sent):
        return [full]  # a tokenizer whose pieces do not add up: send the text whole
    return pieces + [full[len(sent) :]] if len(full) > len(sent) else pieces


class Responder:
    """Writes one request's response bodies; `kind` is "completion" or "chat"."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
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

    def chunks(self, answer: Answer, pieces: list[str], *, include_usage: bool) -> Iterator[dict]:
        """The stream's chunks: the text piece by piece, then the finish reason (and usage)."""
        chat = self.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            choice |= {"logprobs": None, "finish_reason": finish}
            return {**self._envelope(obj, [choice]), **extra}

        if chat:
            yield chunk(None, None, role=True)
        for piece in pieces:
            yield chunk(piece, None)
        yield chunk(None, answer.finish_reason)
        if include_usage:
            yield {**self._envelope(obj, []), "usage": answer.usage()}


def sse(chunks: Iterator[dict]) -> Iterator[str]:
    """Server-sent events: one `data:` line per chunk, then `data: [DONE]`."""
    for chunk in chunks:
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
