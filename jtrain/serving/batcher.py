"""Decodes concurrent requests together: one worker thread, one `Sampler.start` per batch.

Requests wait in a queue while a batch decodes; when it ends the worker takes up to
`max_batch` of them, oldest first, and decodes them as one batch with each row's own
temperature and top-p. All JAX calls happen on the worker thread, the warm-up's included: it
compiles the batch shapes named at construction before the first request is taken, and
requests that arrive meanwhile wait in the queue. A batch decodes for its longest request's
max_tokens, so a request whose prompt plus that would pass the model's positions waits for a
later batch, ahead of newer requests. Each request reads its row through a `Share`, so its own
max_tokens and `stop` strings never end another request's row.

A batch without a streaming request decodes in one compiled loop. A batch with one decodes
`stream_every` tokens per call and hands each streaming request its new text after every call
(the first token right after the prefill); a streaming request is answered as soon as its row
has its tokens, the others when the batch ends.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
from absl import logging

from jtrain import generate
from jtrain.serving import warmup
from jtrain.serving.protocol import Request
from jtrain.serving.share import Share

# The least value of each setting (jtrain.serve checks its flags against these too).
LEAST = {"max_batch": 1, "stream_every": 1, "warmup_prompt_tokens": 0, "warmup_new_tokens": 0}


@dataclasses.dataclass(frozen=True)
class _Job:
    request: Request
    future: concurrent.futures.Future
    listener: Callable[[str], None] | None  # a streaming request's: gets each piece of text


class Batcher:
    """A queue of requests and the worker thread that decodes them in shared batches."""

    def __init__(
        self,
        generator: generate.Generator,
        *,
        max_batch: int = 16,
        seed: int = 0,
        stream_every: int = 8,
        warmup_prompt_tokens: int = 0,
        warmup_new_tokens: int = 0,
    ):
        settings = dict(
            max_batch=max_batch, stream_every=stream_every,
            warmup_prompt_tokens=warmup_prompt_tokens, warmup_new_tokens=warmup_new_tokens,
        )  # fmt: skip
        for name, value in settings.items():
            if value < LEAST[name]:
                raise ValueError(f"{name}={value} is invalid: it must be at least {LEAST[name]}")
        self.generator, self.max_batch, self.seed = generator, max_batch, seed
        self.stream_every = stream_every
        self.warmup_buckets = warmup.buckets(
            max_batch, warmup_prompt_tokens, warmup_new_tokens, generator.sampler.max_len
        )
        self.warmed = 0  # buckets compiled by the warm-up so far
        self.ready = threading.Event()  # set once the warm-up is over: requests are taken
        self.batches = 0  # batches decoded so far
        self.requests = 0  # requests answered so far
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._waiting: collections.deque[_Job] = collections.deque()  # taken, not yet decoded
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Starts the worker thread: the warm-up, then the requests."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jtrain-serve", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Lets the worker finish its batch and the queued requests, then ends it."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(
        self, request: Request, listener: Callable[[str], None] | None = None
    ) -> concurrent.futures.Future:
        """Queues a request; the future resolves to its `Answer`. A `listener` (a streaming
        request's) is called on the worker thread with each piece of its text as it is
        sampled, every piece before the future resolves."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(request, future, listener))
        return future

    def _warm_up(self) -> None:
        start = time.perf_counter()
        try:
            for shape in self.warmup_buckets:
                warmup.compile_bucket(self.generator.sampler, shape, self.generator.stop_ids)
                self.warmed += 1
        except Exception:  # requests may still decode; they compile on first use
            logging.exception("the warm-up failed after %d buckets", self.warmed)
        if self.warmup_buckets:
            logging.info(
                "warm-up: %d of %d buckets (rows, prompt, new tokens) compiled in %.1f s",
                self.warmed, len(self.warmup_buckets), time.perf_counter() - start,
            )  # fmt: skip
        self.ready.set()

    def _run(self) -> None:
        self._warm_up()
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
        g = self.generator
        shares = [Share(job.request, g.stop_ids, g.tokenizer, job.listener) for job in batch]
        try:
            self._sample(batch, shares)
        except Exception as err:  # every request of the batch learns of it; serving goes on
            logging.exception("a batch of %d requests failed", len(batch))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        finally:
            self.batches += 1
        for job, share in zip(batch, shares, strict=True):
            self._resolve(job, share)

    def _sample(self, batch: list[_Job], shares: list[Share]) -> None:
        """Decodes the batch: in one call, or `stream_every` tokens a call while a streaming
        request is still reading; each share reads its row's new tokens after every call."""
        requests = [job.request for job in batch]
        seeds = [r.seed for r in requests if r.seed is not None]
        seed = int(np.random.SeedSequence([self.seed, self.batches, *seeds]).generate_state(1)[0])
        decoding = self.generator.sampler.start(
            [r.prompt_ids.tolist() for r in requests],
            max_new_tokens=max(r.max_tokens for r in requests),
            stop_ids=self.generator.stop_ids,
            temperature=[r.temperature for r in requests],
            top_k=0,
            top_p=[r.top_p for r in requests],
            seed=seed,
        )
        # A stream's first token comes straight from the prefill (advance(0) decodes nothing).
        tokens = 0 if any(job.listener for job in batch) else decoding.max_new_tokens
        while True:
            streaming = False
            for job, share, new in zip(batch, shares, decoding.advance(tokens), strict=True):
                share.take(new)
                if job.listener is not None:
                    if share.ended:
                        self._resolve(job, share)
                    streaming |= not share.ended
            if decoding.finished or all(share.ended for share in shares):
                return
            tokens = self.stream_every if streaming else decoding.max_new_tokens

    def _resolve(self, job: _Job, share: Share) -> None:
        if job.future.done():
            return
        self.requests += 1
        try:
            job.future.set_result(share.answer())
        except Exception as err:
            job.future.set_exception(err)
