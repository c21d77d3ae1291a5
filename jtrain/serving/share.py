"""One request's share of its batch row: its tokens up to its own limits, and its stream.

A batch decodes every row for its longest request's max_tokens and stops a row only on the
model's own stop tokens (EOS, the chat template's end of turn), so each request reads its row
through a `Share`: the tokens up to its max_tokens and before its first stop token (the model's
or its own `stop` strings), whether they come in one piece at the end or a few at a time while
the batch decodes. A streaming request's share turns its tokens into text as they come and
hands each piece to the request's listener.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from jtrain.serving.protocol import Request
from jtrain.serving.responses import Answer, TextStream


class Share:
    """Reads one request's tokens off its row; `listener` gets its text pieces as they come."""

    def __init__(
        self,
        request: Request,
        stop_ids: Sequence[int],
        tokenizer,
        listener: Callable[[str], None] | None = None,
    ):
        self.request, self.tokenizer, self.listener = request, tokenizer, listener
        self._stops = {*map(int, stop_ids), *request.stop_ids}
        self._ids: list[int] = []  # the answer's tokens: no stop token
        self._stream = TextStream(tokenizer) if listener else None
        self.finish_reason: str | None = None  # set once the request has its tokens

    @property
    def ended(self) -> bool:
        """The request has all its tokens: a stop token or its max_tokens met."""
        return self.finish_reason is not None

    def take(self, tokens: np.ndarray) -> None:
        """Reads the row's next tokens (what follows is ignored once the request ended)."""
        kept = []
        for token in map(int, tokens):
            if self.ended:
                break
            if token in self._stops:
                self.finish_reason = "stop"
            else:
                kept.append(token)
                if len(self._ids) + len(kept) == self.request.max_tokens:
                    self.finish_reason = "length"
        self._ids += kept
        if self._stream is not None and kept:
            self._send(self._stream.push(kept))

    def answer(self) -> Answer:
        """The request's answer; a stream gets the text it has not been sent yet first."""
        ids = np.asarray(self._ids, np.int32)
        text = self.tokenizer.decode(ids)
        if self._stream is not None:
            self._send([self._stream.finish(text)])
        stopped = self.finish_reason == "stop"
        return Answer(
            ids=ids,
            text=text,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=int(self.request.prompt_ids.size),
            completion_tokens=ids.size + stopped,  # the stop token was generated
        )

    def _send(self, pieces: list[str]) -> None:
        for piece in pieces:
            if piece and self.listener is not None:
                try:
                    self.listener(piece)
                except Exception:  # the client's end is gone: its batch goes on without it
                    logging.exception("a stream's listener failed; its later pieces are dropped")
                    self.listener = None
