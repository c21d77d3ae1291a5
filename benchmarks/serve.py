"""Throughput of `jtrain.serve` with 16 concurrent clients against one client at a time.

    python benchmarks/serve.py [--workdir=runs/default] [--requests=32] [--max_tokens=32]

Starts the OpenAI-compatible app in this process on a free 127.0.0.1 port (uvicorn in a
thread), then sends the same greedy completion requests (different prompts, `--max_tokens`
each) twice: one after another from one client, and from 16 client threads at once, which
the server decodes together in shared batches. Prints completions/s and tokens/s of both and
their ratio, and the number of batches the server ran. Always exits 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import sys
import threading
import time
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # `import jtrain` without installing

import uvicorn  # noqa: E402

from jtrain import generate, serve  # noqa: E402


def _start(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def _complete(url: str, model: str, prompt: str, max_tokens: int) -> int:
    body = json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    ).encode()
    request = urllib.request.Request(
        url + "/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)["usage"]["completion_tokens"]


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
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.workdir, "config.json")):
        print(f"{args.workdir} is not a trained run; train one first:")
        print("  python -m jtrain.main --config=configs/default.py --workdir=runs/default")
        return
    generator = generate.load(args.workdir)
    name = serve.model_name(args.workdir)
    app = serve.create_app(generator, model_name=name, max_batch=16)
    url, server, thread = _start(app)
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
    server.should_exit = True
    thread.join(30)
    print(f"run              : {args.workdir}; {args.requests} requests x {args.max_tokens} tokens")
    rate = f"{args.requests / one_s:.2f} completions/s, {one_tokens / one_s:,.0f} tokens/s"
    print(f"1 client         : {rate}")
    print(
        f"16 clients       : {args.requests / many_s:.2f} completions/s, "
        f"{many_tokens / many_s:,.0f} tokens/s"
    )
    print(f"server batches   : {many_batches} for both runs' {2 * args.requests} requests")
    print(f"RATIO 16 clients / 1 client throughput = {one_s / many_s:.2f}")


if __name__ == "__main__":
    main()
