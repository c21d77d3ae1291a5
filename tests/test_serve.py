"""python -m jtrain.serve: the official openai client works unchanged, greedy text is the
Sampler's, streams say what whole answers say, concurrent requests share batches, the warm-up
compiles what requests meet, bad requests get OpenAI's 4xx error bodies."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from jtrain import generate, serve  # noqa: E402
from jtrain.sampler import Sampler  # noqa: E402
from jtrain.serving import local, protocol  # noqa: E402
from jtrain.serving.batcher import Batcher  # noqa: E402
from tests.conftest import REPO, main_env, tiny_trained_run  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def generator(run):
    generator = generate.load(run)
    generator.reference = Sampler(generator.model)  # the server's answers, computed apart
    return generator


def _bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(run, generator):
    """The app on a free 127.0.0.1 port, in a background thread: (base url, app)."""
    app = serve.create_app(generator, model_name=serve.model_name(run), max_batch=16)
    with local.running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=120)


def _expected(generator, ids, max_tokens, stops=()) -> tuple[str, str]:
    """(text, finish_reason) of a greedy completion by the Sampler alone."""
    tokens = generator.reference.generate(
        [list(ids)], max_new_tokens=max_tokens, stop_ids=[*generator.stop_ids, *stops]
    )[0]
    ids = tokens.tokens[:-1] if tokens.finish_reason == "stop" else tokens.tokens
    return generator.tokenizer.decode(ids), tokens.finish_reason


def _joined(stream, chat: bool) -> tuple[str, str, dict]:
    """(text, finish_reason, usage) of a stream's chunks, checked for OpenAI's chunk shape."""
    chunks = list(stream)
    assert all(c.id == chunks[0].id for c in chunks)
    assert all(c.object == ("chat.completion.chunk" if chat else "text_completion") for c in chunks)
    pieces = [c.choices[0] for c in chunks if c.choices]
    text = "".join((p.delta.content if chat else p.text) or "" for p in pieces)
    assert [p.finish_reason for p in pieces].count(None) == len(pieces) - 1
    return text, pieces[-1].finish_reason, chunks[-1].usage.model_dump()


def test_the_openai_client_lists_the_model(client, run):
    assert [m.id for m in client.models.list().data] == [os.path.basename(run)]
    assert client.models.retrieve(os.path.basename(run)).id == os.path.basename(run)


def test_greedy_completions_are_the_samplers(client, generator, run):
    name = os.path.basename(run)
    for prompt in ["Hello there", [5, 17, 99, 3, 42]]:
        line = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_ids": prompt}
        ids = generator.prompt_ids(line, 0)
        out = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
        text, reason = _expected(generator, ids, 12)
        assert out.object == "text_completion" and out.model == name
        assert (out.choices[0].text, out.choices[0].finish_reason) == (text, reason)
        assert out.usage.prompt_tokens == ids.size
        assert out.usage.total_tokens == ids.size + out.usage.completion_tokens
        assert reason == "stop" or out.usage.completion_tokens == 12


def test_a_stop_string_ends_the_text_before_it(client, generator, run):
    ids = generator.prompt_ids({"prompt": "Hello there"}, 0)
    full = generator.reference.generate([ids.tolist()], max_new_tokens=12)[0].tokens
    stop = next((int(t) for t in full[1:] if t < 128), None)  # an ASCII byte: one token
    if stop is None:
        pytest.skip("the greedy completion holds no ASCII byte to stop at")
    out = client.completions.create(
        model=os.path.basename(run), prompt="Hello there", max_tokens=12, temperature=0,
        stop=[chr(stop)],
    )  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == _expected(generator, ids, 12, stops=[stop])[0]
    stream = client.completions.create(
        model=os.path.basename(run), prompt="Hello there", max_tokens=12, temperature=0,
        stop=[chr(stop)], stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    assert _joined(stream, chat=False) == (out.choices[0].text, "stop", out.usage.model_dump())


def test_streams_say_what_the_whole_answers_say(client, generator, run):
    name = os.path.basename(run)
    ids = generator.prompt_ids({"messages": MESSAGES}, 0)
    ask = {"model": name, "max_tokens": 10, "temperature": 0}
    out = client.chat.completions.create(messages=MESSAGES, **ask)
    text, reason = _expected(generator, ids, 10)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (text, reason)
    assert out.usage.prompt_tokens == ids.size
    usage = {"stream_options": {"include_usage": True}}
    stream = client.chat.completions.create(messages=MESSAGES, stream=True, **ask, **usage)
    assert next(stream).choices[0].delta.role == "assistant"
    stream = client.chat.completions.create(messages=MESSAGES, stream=True, **ask, **usage)
    assert _joined(stream, chat=True) == (text, reason, out.usage.model_dump())

    ask["max_tokens"] = 12
    for prompt in ["Hello there", [5, 17, 99, 3, 42]]:
        out = client.completions.create(prompt=prompt, **ask)
        stream = client.completions.create(prompt=prompt, stream=True, **ask, **usage)
        whole = (out.choices[0].text, out.choices[0].finish_reason, out.usage.model_dump())
        assert _joined(stream, chat=False) == whole


def test_the_stream_is_server_sent_events_ending_with_done(server, run):
    body = {"model": os.path.basename(run), "prompt": "Hi", "max_tokens": 3, "stream": True}
    request = urllib.request.Request(server[0] + "/v1/completions", json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_sampled_requests_keep_their_settings(client, run):
    name = os.path.basename(run)
    out = client.completions.create(
        model=name, prompt="Hi", max_tokens=5, temperature=1.3, top_p=0.9, seed=1
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 5


def test_concurrent_clients_share_batches(client, generator, server, run):
    name, batcher = os.path.basename(run), server[1].state.batcher
    prompts = [f"Question {i}: " + "why" * (i % 4) for i in range(16)]
    lengths = [4 + i % 5 for i in range(16)]
    expected = [
        _expected(generator, generator.prompt_ids({"prompt": p}, 0), n)
        for p, n in zip(prompts, lengths, strict=True)
    ]
    batches, start = batcher.batches, threading.Barrier(16)

    def ask(i):
        start.wait(timeout=30)
        out = client.completions.create(
            model=name, prompt=prompts[i], max_tokens=lengths[i], temperature=0
        )
        return out.choices[0].text, out.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16), timeout=300))
    assert answers == expected
    assert batcher.batches - batches < 16, f"{batcher.batches - batches} batches"


def _request(ids, max_tokens: int, stream: bool) -> protocol.Request:
    return protocol.Request(
        np.asarray(ids, np.int32), max_tokens, 0.0, 1.0, (), None, stream, False
    )


def test_a_stream_and_a_whole_answer_share_a_batch(generator):
    batcher, pieces = Batcher(generator, max_batch=4, stream_every=3), []
    prompts = [generator.prompt_ids({"prompt": p}, 0) for p in ["Hello there", "Why"]]
    streamed = batcher.submit(_request(prompts[0], 11, stream=True), pieces.append)
    whole = batcher.submit(_request(prompts[1], 7, stream=False))
    batcher.start()
    answers = [streamed.result(timeout=120), whole.result(timeout=120)]
    batcher.stop()
    assert batcher.batches == 1
    assert len(pieces) > 1 and "".join(pieces) == answers[0].text
    expected = [_expected(generator, ids, n) for ids, n in zip(prompts, [11, 7], strict=True)]
    assert [(a.text, a.finish_reason) for a in answers] == expected


def test_the_warm_up_compiles_every_bucket_requests_in_its_limits_meet(run):
    fresh = generate.load(run)  # a sampler nothing has compiled for yet
    batcher = Batcher(fresh, max_batch=2, warmup_prompt_tokens=16, warmup_new_tokens=16)
    assert batcher.warmup_buckets == [(1, 16, 16), (2, 16, 16)]
    batcher.start()
    assert batcher.ready.wait(120) and batcher.warmed == 2
    assert fresh.sampler.compilations() == 2
    ids = fresh.prompt_ids({"prompt": "Hi there, how"}, 0)
    futures = [batcher.submit(_request(ids[: 4 + i], 16 - i, stream=i == 1)) for i in range(3)]
    answers = [f.result(timeout=120) for f in futures]
    batcher.stop()
    assert all(a.completion_tokens >= 1 for a in answers)
    assert fresh.sampler.compilations() == 2 and fresh.sampler.buckets == {(1, 16, 16), (2, 16, 16)}


BAD = [  # (route, body, status, param, words in the message)
    ("completions", b"{not json", 400, None, "not valid JSON"),
    ("completions", b"[1, 2]", 400, None, "JSON object"),
    ("completions", {"prompt": "Hi"}, 400, "model", "model is required"),
    ("completions", {"model": "gpt-4", "prompt": "Hi"}, 404, "model", "'gpt-4' does not exist"),
    ("completions", {"model": "M", "max_tokens": 4}, 400, "prompt", "prompt must be"),
    ("completions", {"model": "M", "prompt": 7}, 400, "prompt", "prompt must be"),
    ("completions", {"model": "M", "prompt": ["a", "b"]}, 400, "prompt", "one per request"),
    ("completions", {"model": "M", "prompt": [99999]}, 400, "prompt", "vocabulary"),
    ("completions", {"model": "M", "prompt": "x" * 70}, 400, "prompt", "64 positions"),
    (
        "completions",
        {"model": "M", "prompt": "x" * 40, "max_tokens": 40},
        400,
        "max_tokens",
        "exceed the model's 64 positions",
    ),  # fmt: skip
    ("completions", {"model": "M", "prompt": "Hi", "n": 2}, 400, "n", "n=2 is not supported"),
    (
        "completions",
        {"model": "M", "prompt": "Hi", "temperature": -1},
        400,
        "temperature",
        ">= 0",
    ),  # fmt: skip
    (
        "completions",
        {"model": "M", "prompt": "Hi", "temperature": "hot"},
        400,
        "temperature",
        "number",
    ),  # fmt: skip
    ("completions", {"model": "M", "prompt": "Hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("completions", {"model": "M", "prompt": "Hi", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    (
        "completions",
        {"model": "M", "prompt": "Hi", "max_tokens": 0},
        400,
        "max_tokens",
        "at least 1",
    ),  # fmt: skip
    (
        "completions",
        {"model": "M", "prompt": "Hi", "stop": "ab"},
        400,
        "stop",
        "exactly one token",
    ),  # fmt: skip
    (
        "completions",
        {"model": "M", "prompt": "Hi", "logprobs": 2},
        400,
        "logprobs",
        "not supported",
    ),  # fmt: skip
    ("completions", {"model": "M", "prompt": "Hi", "stream": "yes"}, 400, "stream", "true or"),
    ("chat/completions", {"model": "M"}, 400, "messages", "non-empty list"),
    (
        "chat/completions",
        {"model": "M", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages",
        "needs a role",
    ),  # fmt: skip
    (
        "chat/completions",
        {"model": "M", "messages": MESSAGES, "max_completion_tokens": -3},
        400,
        "max_completion_tokens",
        "at least 1",
    ),  # fmt: skip
    ("nowhere", {}, 404, None, "Not Found"),
]


def _post(url, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("route,body,status,param,words", BAD)
def test_bad_requests_get_openai_errors(server, run, route, body, status, param, words):
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": os.path.basename(run)}
    code, reply = _post(f"{server[0]}/v1/{route}", body)
    assert code == status
    assert set(reply) == {"error"} and reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["param"] == param and reply["error"]["code"] is None
    assert words in reply["error"]["message"]


def test_the_client_raises_its_own_errors_and_the_server_keeps_serving(client, run):
    name = os.path.basename(run)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model=name, prompt="Hi", n=3)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=MESSAGES)
    out = client.completions.create(model=name, prompt="Hi", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_command_line_serves_until_stopped(run):
    sock = _bound_socket()
    port = sock.getsockname()[1]
    sock.close()  # the server binds it again
    command = [sys.executable, "-m", "jtrain.serve", f"--model={run}", f"--port={port}"]
    command += ["--max_batch=2", "--warmup_prompt_tokens=16", "--warmup_new_tokens=16"]
    proc = subprocess.Popen(command, cwd=REPO, env=main_env(1), stderr=subprocess.PIPE, text=True)
    try:
        deadline, reply = time.monotonic() + 120, None
        while reply is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    reply = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert reply == {"status": "ok"}, proc.stderr.read() if proc.poll() is not None else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            assert json.loads(r.read())["data"][0]["id"] == os.path.basename(run)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "warm-up: 2 of 2 buckets" in proc.stderr.read()
