"""Throughput of `jtrain.serve` with 16 concurrent clients against one client at a time; what
the warm-up and streaming buy.

    python benchmarks/serve.py [--workdir=runs/default] [--requests=32] [--max_tokens=32] \
        [--stream_tokens=128] [--skip_restart]

Starts the OpenAI-compatible app in this process on a free 127.0.0.1 port (uvicorn in a
thread), then sends the same greedy completion requests (different prompts, `--max_tokens`
each) twice: one after another from one client, and from 16 client threads at once, which
the server decodes together in shared batches. Prints completions/s and tokens/s of both and
their ratio, and the number of batches the server ran.

Then: the latency of the first request of a bucket nothing has compiled, on a fresh server
without a warm-up and on one whose warm-up covered it; the time to the first streamed token of
a `--stream_tokens` completion against the whole completion's (the server's default
--stream_every); and, unless --skip_restart, `python -m jtrain.serve`'s warm-up with its
default limits, cold and again from --compile_cache as a restarted server reads it. Always
exits 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` without installing

from jtrain import generate, serve  # noqa: E402
from jtrain.serving import local  # noqa: E402


def _post(url: str, model: str, prompt: str, max_tokens: int, stream: bool = False):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    data = json.dumps({**body, "stream": stream}).encode()
    request = urllib.request.Request(
        url + "/v1/completions", data, {"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=600)


def _complete(url: str, model: str, prompt: str, max_tokens: int) -> int:
    with _post(url, model, prompt, max_tokens) as response:
        return json.load(response)["usage"]["completion_tokens"]


def _first_and_last(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    """Seconds from sending a streaming request to its first text chunk and to [DONE]."""
    start, first = time.perf_counter(), None
    with _post(url, model, prompt, max_tokens, stream=True) as response:
        for line in response:
            if first is None and line.startswith(b"data: {") and json.loads(line[6:])["choices"]:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


def _timed(fn, prompts, clients: int) -> tuple[float, int]:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(fn, prompts))
    return time.perf_counter() - start, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=os.path.join(REPO_ROOT, "runs", "default"))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--stream_tokens", type=int, default=128)
    p.add_argument("--skip_restart", action="store_true", help="no warm-up from the cache")
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
        print(f"{args.workdir} is not a trained run; train one first:")
        print("  python -m jtrain.main --config=configs/default.py --workdir=runs/default")
        return
    generator = generate.load(args.workdir)
    name = serve.model_name(args.workdir)
    app = serve.create_app(generator, model_name=name, max_batch=16)
    with local.running(app) as url:
        prompts = [f"The {word} statement" for word in ("for", "while", "if", "try", "with")] * (
            args.requests // 5 + 1
        )
        prompts = prompts[: args.requests]

        def fn(prompt):
            return _complete(url, name, prompt, args.max_tokens)

        # Compile every batch-size bucket the runs can meet (1, 2, 4, 8, 16 rows), so that
        # neither side pays for compilation while timed.
        ids = [generator.tokenizer.encode(p, add_bos=True, add_eos=False).tolist() for p in prompts]
        for rows in (1, 2, 4, 8, 16):
            generator.sampler.generate(ids[:rows], max_new_tokens=args.max_tokens)
        _timed(fn, prompts[:16], 16)
        batches = app.state.batcher.batches
        one_s, one_tokens = _timed(fn, prompts, 1)
        many_s, many_tokens = _timed(fn, prompts, 16)
        many_batches = app.state.batcher.batches - batches
        streamed = _complete(url, name, prompts[0], args.stream_tokens)  # compiles its bucket
        times = [_first_and_last(url, name, prompts[0], args.stream_tokens) for _ in range(5)]
    print(f"run              : {args.workdir}; {args.requests} requests x {args.max_tokens} tokens")
    rate = f"{args.requests / one_s:.2f} completions/s, {one_tokens / one_s:,.0f} tokens/s"
    print(f"1 client         : {rate}")
    print(
        f"16 clients       : {args.requests / many_s:.2f} completions/s, "
        f"{many_tokens / many_s:,.0f} tokens/s"
    )
    print(f"server batches   : {many_batches} for both runs' {2 * args.requests} requests")
    print(f"RATIO 16 clients / 1 client throughput = {one_s / many_s:.2f}")
    first, whole = (statistics.median(t) * 1e3 for t in zip(*times, strict=True))
    print(
        f"stream           : first token {first:.1f} ms, whole {streamed}-token completion "
        f"{whole:.1f} ms (medians of 5; --stream_every=8)"
    )
    _cold_bucket(args, prompts[0], len(ids[0]))
    if not args.skip_restart:
        _restart(args.workdir)


def _cold_bucket(args, prompt: str, prompt_tokens: int) -> None:
    """The first request of a bucket no program exists for, on a fresh server (one row,
    --max_tokens new tokens), without a warm-up and after one that covered it."""
    for warm in (False, True):
        generator = generate.load(args.workdir)  # a fresh sampler: nothing compiled yet
        app = serve.create_app(
            generator, model_name="m", max_batch=1, warmup_prompt_tokens=warm * prompt_tokens,
            warmup_new_tokens=warm * args.max_tokens,
        )  # fmt: skip
        start = time.perf_counter()
        with local.running(app) as url:
            app.state.batcher.ready.wait()
            warmup_s, start = time.perf_counter() - start, time.perf_counter()
            _complete(url, "m", prompt, args.max_tokens)
            latency_ms = (time.perf_counter() - start) * 1e3
        buckets = len(app.state.batcher.warmup_buckets)
        how = f"after a {warmup_s:.1f} s warm-up ({buckets} buckets)" if warm else "no warm-up"
        print(f"cold bucket      : first request {latency_ms:,.0f} ms {how}")


def _restart(workdir: str) -> None:
    """`python -m jtrain.serve`'s default warm-up, cold and then from its --compile_cache."""
    with tempfile.TemporaryDirectory() as cache:
        for state in ("cold", "from the cache"):
            seconds, buckets = _serve_until_healthy(workdir, cache)
            print(f"server warm-up   : {buckets} buckets in {seconds:.1f} s, {state}")


def _serve_until_healthy(workdir: str, cache: str) -> tuple[float, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # the server binds it again
    command = [sys.executable, "-m", "jtrain.serve", f"--model={workdir}", f"--port={port}"]
    command.append(f"--compile_cache={cache}")
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        while proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except (urllib.error.HTTPError, OSError):
                time.sleep(1)
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[1]
    found = re.search(r"warm-up: (\d+ of \d+) buckets .* in ([\d.]+) s", log)
    return (float(found[2]), found[1]) if found else (float("nan"), log[-300:])


if __name__ == "__main__":
    main()
