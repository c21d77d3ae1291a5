"""The server's batcher with a scripted sampler (no model): requests read their own rows,
streams get each decode step's text before the next step runs, a failed or abandoned stream
leaves the server serving, and /health answers 503 until the warm-up is over."""

import contextlib
import threading
import time
import types

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from jtrain import serve  # noqa: E402
from jtrain.data import tokenizers  # noqa: E402
from jtrain.serving import local, protocol, responses  # noqa: E402
from jtrain.serving.batcher import Batcher  # noqa: E402

EOS = 258


class _Decoding:
    """Row i samples 65, 66, ... ('A', 'B', ...); every call is logged in the sampler's log."""

    def __init__(self, sampler, rows: int, max_new: int):
        self.sampler, self.max_new_tokens = sampler, max_new
        self.step, self.sent, self.finished = 1, [0] * rows, False

    def advance(self, tokens: int) -> list[np.ndarray]:
        self.sampler.log.append(("advance", tokens))
        if tokens and self.sampler.before_decode is not None:
            self.sampler.before_decode()
        self.step = min(self.step + tokens, self.max_new_tokens)
        self.finished = self.step == self.max_new_tokens
        ids = np.arange(65, 65 + self.step, dtype=np.int32)
        new, self.sent = [ids[s:] for s in self.sent], [self.step] * len(self.sent)
        return new


class _Sampler:
    """Records every batch; `before_decode` runs before each decoding call, `hold_start`
    (an Event) holds every batch's start until it is set."""

    def __init__(self, max_len=64):
        self.max_len, self.calls, self.log = max_len, [], []
        self.before_decode, self.hold_start = None, None

    def start(self, prompts, *, max_new_tokens, **settings):
        if self.hold_start is not None:
            assert self.hold_start.wait(30)
        self.calls.append((len(prompts), len(prompts[0]), max_new_tokens, settings))
        return _Decoding(self, len(prompts), max_new_tokens)


def _generator(sampler):
    return types.SimpleNamespace(
        sampler=sampler,
        stop_ids=[EOS],
        tokenizer=tokenizers.ByteTokenizer(),
        prompt_ids=lambda line, _: np.asarray(line["prompt_ids"], np.int32),
    )


def _request(prompt: int, max_tokens: int, stop_ids=(), temperature=0.0, stream=False):
    return protocol.Request(
        np.ones(prompt, np.int32), max_tokens, temperature, 1.0, stop_ids, None, stream, False
    )


def test_batches_fit_the_model_and_stops_apply_per_request():
    sampler = _Sampler(max_len=64)
    batcher = Batcher(_generator(sampler), max_batch=3)
    requests = [
        _request(40, 8),  # with the next one a batch would need 40 + 40 positions
        _request(8, 40),
        _request(8, 8, stop_ids=(67,), temperature=0.5),
        _request(8, 4),
        _request(8, 4),
    ]
    futures = [batcher.submit(r) for r in requests]  # all queued before the worker starts
    batcher.start()
    answers = [f.result(timeout=30) for f in futures]
    batcher.stop()
    assert [c[::2] for c in sampler.calls] == [(3, 8), (2, 40)]
    assert sampler.calls[0][3]["temperature"] == [0.0, 0.5, 0.0]
    assert [e for e in sampler.log if e[1]] == [("advance", 8), ("advance", 40)]  # one call each
    forty = "".join(chr(i) for i in range(65, 105))
    assert [a.text for a in answers] == ["ABCDEFGH", forty, "AB", "ABCD", "ABCD"]
    assert [a.finish_reason for a in answers] == ["length", "length", "stop", "length", "length"]
    assert answers[2].completion_tokens == 3 and (batcher.batches, batcher.requests) == (2, 5)


def test_a_stream_gets_each_steps_text_before_the_next_step_and_its_answer_early():
    sampler = _Sampler()
    batcher = Batcher(_generator(sampler), max_batch=4, stream_every=2)
    log = sampler.log
    streams = [
        batcher.submit(_request(3, 5, stream=True), lambda p: log.append(("first", p))),
        batcher.submit(
            _request(3, 9, stop_ids=(68,), stream=True), lambda p: log.append(("stop", p))
        ),
    ]
    plain = batcher.submit(_request(3, 12))
    for name, future in zip(["first", "stop"], streams, strict=True):
        future.add_done_callback(lambda f, name=name: log.append(("answer", name)))
    plain.add_done_callback(lambda f: log.append(("answer", "plain")))
    batcher.start()
    answers = [f.result(timeout=30) for f in [*streams, plain]]
    batcher.stop()
    assert log == [
        ("advance", 0), ("first", "A"), ("stop", "A"),
        ("advance", 2), ("first", "B"), ("first", "C"), ("stop", "B"), ("stop", "C"),
        ("advance", 2), ("first", "D"), ("first", "E"), ("answer", "first"),
        ("answer", "stop"),  # 'D' is its stop token
        ("advance", 12), ("answer", "plain"),  # no stream left: the rest in one call
    ]  # fmt: skip
    assert [(a.text, a.finish_reason, a.completion_tokens) for a in answers] == [
        ("ABCDE", "length", 5), ("ABC", "stop", 4), ("ABCDEFGHIJKL", "length", 12),
    ]  # fmt: skip


def test_text_streams_hold_back_partial_characters_and_join_to_the_text():
    tokenizer = tokenizers.ByteTokenizer()
    text = "héllo ☃!"
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    stream = responses.TextStream(tokenizer)
    assert [p for t in ids for p in stream.push([t])] == ["h", "é", "l", "l", "o", " ", "☃", "!"]
    stream = responses.TextStream(tokenizer)
    steps = [stream.push(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert all("\ufffd" not in p for step in steps for p in step)
    assert "".join(p for step in steps for p in step) + stream.finish(text) == text
    broken = responses.TextStream(tokenizer)  # a character cut off by max_tokens
    assert broken.push(ids[:2]) == ["h"] and broken.finish(tokenizer.decode(ids[:2])) == "\ufffd"


def test_settings_are_checked():
    for name in ["max_batch", "stream_every"]:
        with pytest.raises(ValueError, match=f"{name}=0 is invalid"):
            Batcher(_generator(_Sampler()), **{name: 0})


@contextlib.contextmanager
def _serving(sampler, **settings):
    """The app over a scripted sampler on a free port: (openai client, app)."""
    app = serve.create_app(_generator(sampler), model_name="m", **settings)
    with local.running(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30), app


def _stream(client, max_tokens: int, **options):
    return client.completions.create(
        model="m", prompt=[1, 2, 3], max_tokens=max_tokens, temperature=0, stream=True, **options
    )


def test_chunks_arrive_while_the_batch_decodes():
    sampler, seen = _Sampler(), threading.Event()

    def before_decode():
        if not seen.wait(10):
            raise RuntimeError("no chunk reached the client before the batch went on")

    sampler.before_decode = before_decode
    with _serving(sampler, stream_every=1) as (client, _):
        texts = []
        for chunk in _stream(client, 3, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text:
                texts.append(chunk.choices[0].text)
                seen.set()  # the batch may go on only once the client has this chunk
            last = chunk
    assert texts == ["A", "B", "C"] and last.usage.completion_tokens == 3
    assert [e for e in sampler.log if e[0] == "advance"] == [("advance", i) for i in [0, 1, 1]]


def test_a_failed_batch_ends_the_stream_with_an_error_and_serving_goes_on():
    sampler = _Sampler()

    def fail():
        sampler.before_decode = None
        raise RuntimeError("out of memory")

    sampler.before_decode = fail
    with _serving(sampler) as (client, _):
        stream = _stream(client, 4)
        with pytest.raises(openai.APIError, match="decoding failed: out of memory"):
            assert next(stream).choices[0].text == "A"  # the prefill's token came through
            list(stream)
        assert "".join(c.choices[0].text for c in _stream(client, 2)) == "AB"


def test_a_client_that_leaves_mid_stream_does_not_stop_the_batch():
    sampler, left = _Sampler(), threading.Event()
    sampler.before_decode = lambda: left.wait(20)
    with _serving(sampler, stream_every=1) as (client, app):
        stream = _stream(client, 6)
        assert next(stream).choices[0].text == "A"
        stream.close()
        time.sleep(0.2)  # the server sees the disconnect
        left.set()
        out = client.completions.create(model="m", prompt=[1], max_tokens=2, temperature=0)
        assert out.choices[0].text == "AB" and app.state.batcher.requests == 2


def test_health_is_503_until_the_warm_up_is_over():
    sampler = _Sampler()
    sampler.hold_start = threading.Event()
    with _serving(sampler, max_batch=2, warmup_prompt_tokens=16, warmup_new_tokens=16) as (
        client,
        app,
    ):
        health = client.with_options(base_url=str(client.base_url).removesuffix("v1/"))
        with pytest.raises(openai.APIStatusError) as refused:
            health.get("health", cast_to=object)
        assert refused.value.status_code == 503
        assert refused.value.body == {"status": "warming up", "buckets": 2, "compiled": 0}
        waiting = threading.Thread(target=lambda: _stream(client, 2).close())
        waiting.start()  # a request sent while warming up waits in the queue
        sampler.hold_start.set()
        assert app.state.batcher.ready.wait(10)
        assert health.get("health", cast_to=object) == {"status": "ok"}
        waiting.join(10)
    assert [c[:3] for c in sampler.calls[:2]] == [(1, 1, 1), (2, 1, 1)]  # (rows, prompt, new)
