"""Decodes concurrent requests together: one worker thread, one `Sampler.generate` per batch.

Requests wait in a queue while a batch decodes; when it ends the worker takes up to
`max_batch` of them, oldest first, and decodes them as one batch with each row's own
temperature and top-p. All JAX calls happen on the worker thread. A batch decodes for its
longest request's max_tokens, so a request whose prompt plus that would pass the model's
positions waits for a later batch, ahead of newer requests. The sampler stops a row on the
model's own stop tokens (EOS, the chat template's end of turn); a request's `stop` strings are
applied to its row afterwards, so they never end another request's row.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading

import numpy as np
from absl import logging

from jtrain import generate
from jtrain.serving.protocol import Request
from jtrain.serving.responses import Answer


@dataclasses.dataclass(frozen=True)
class _Job:
    request: Request
    future: concurrent.futures.Future


class Batcher:
    """A queue of requests and the worker thread that decodes them in shared batches."""

    def __init__(self, generator: generate.Generator, *, max_batch: int = 16, seed: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} is invalid: it must be at least 1")
        self.generator, self.max_batch, self.seed = generator, max_batch, seed
        self.batches = 0  # Sampler.generate calls so far
        self.requests = 0  # requests answered so far
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._waiting: collections.deque[_Job] = collections.deque()  # taken, not yet decoded
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Starts the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jtrain-serve", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Lets the worker finish its batch and the queued requests, then ends it."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: Request) -> concurrent.futures.Future:
        """Queues a request; the future resolves to its `Answer`."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(request, future))
        return future

    def _run(self) -> None:
        stopping = False
        while not stopping or self._waiting:
            if not self._waiting:
                job = self._queue.get()
                if job is None:
                    break
                self._waiting.append(job)
            while True:  # everything queued meanwhile joins the line
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                stopping |= job is None
                if job is not None:
                    self._waiting.append(job)
            batch: list[_Job] = []
            try:
                batch = self._take()
                self._decode(batch)
            except Exception as err:  # a bug here must not leave these requests hanging
                logging.exception("the serving worker failed")
                for job in [*batch, *self._waiting]:
                    if not job.future.done():
                        job.future.set_exception(err)
                self._waiting.clear()

    def _take(self) -> list[_Job]:
        """The oldest jobs that fit in one batch (the oldest always does); the rest wait."""
        max_len = self.generator.sampler.max_len
        batch, kept, longest, most = [], collections.deque(), 0, 0
        for job in self._waiting:
            size, new = job.request.prompt_ids.size, job.request.max_tokens
            fits = not max_len or max(longest, size) + max(most, new) <= max_len
            if len(batch) < self.max_batch and fits:
                if job.future.set_running_or_notify_cancel():  # False: the client left
                    batch.append(job)
                    longest, most = max(longest, size), max(most, new)
            else:
                kept.append(job)
        self._waiting = kept
        return batch

    def _decode(self, batch: list[_Job]) -> None:
        if not batch:
            return  # every waiting request's client had left
        requests = [job.request for job in batch]
        seeds = [r.seed for r in requests if r.seed is not None]
        seed = int(np.random.SeedSequence([self.seed, self.batches, *seeds]).generate_state(1)[0])
        try:
            completions = self.generator.sampler.generate(
                [r.prompt_ids.tolist() for r in requests],
                max_new_tokens=max(r.max_tokens for r in requests),
                stop_ids=self.generator.stop_ids,
                temperature=[r.temperature for r in requests],
                top_k=0,
                top_p=[r.top_p for r in requests],
                seed=seed,
            )
        except Exception as err:  # every request of the batch learns of it; serving goes on
            logging.exception("a batch of %d requests failed", len(batch))
            for job in batch:
                job.future.set_exception(err)
            return
        finally:
            self.batches += 1
        for job, completion in zip(batch, completions, strict=True):
            self.requests += 1
            try:
                job.future.set_result(self._answer(job.request, completion.tokens))
            except Exception as err:
                job.future.set_exception(err)

    def _answer(self, request: Request, tokens: np.ndarray) -> Answer:
        """The request's share of its row: up to its own max_tokens and first stop token."""
        tokens = tokens[: request.max_tokens]
        stops = np.flatnonzero(np.isin(tokens, [*self.generator.stop_ids, *request.stop_ids]))
        ids = tokens[: stops[0]] if stops.size else tokens
        return Answer(
            ids=ids,
            text=self.generator.tokenizer.decode(ids),
            finish_reason="stop" if stops.size else "length",
            prompt_tokens=int(request.prompt_ids.size),
            completion_tokens=int(ids.size) + bool(stops.size),  # the stop token was generated
        )
