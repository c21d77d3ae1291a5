r"""Serves a jtrain run or a Hugging Face model over OpenAI's HTTP API.

    python -m jtrain.serve --model=RUN_DIR|hf:PATH|hf:ORG/NAME[@REVISION] [--host=127.0.0.1 \
        --port=8000 --quantize=none|int8 --max_batch=16 --step=N --served_model_name=NAME \
        --stream_every=8 --warmup_prompt_tokens=128 --warmup_new_tokens=16 --compile_cache=DIR]

Routes: `POST /v1/completions` (prompt: text, encoded after BOS, or token ids),
`POST /v1/chat/completions` (messages rendered with the model's chat template), `GET /v1/models`
(one model, named --served_model_name, else after --model's Hub id or directory) and
`GET /health`; the official `openai` clients work unchanged. Supported request fields: model,
prompt/messages, max_tokens (chat: or max_completion_tokens), temperature (0 = greedy), top_p,
stop (strings that are one token each), seed, stream and stream_options.include_usage; n must
be 1. A bad request gets a 4xx and OpenAI's error body, naming the field and what is allowed.

Concurrent requests are decoded together: one worker thread takes up to --max_batch waiting
requests and decodes them as one batch of `jtrain.sampler.Sampler`, each row with its own
temperature and top-p; requests arriving meanwhile wait for the next batch. `stream=true` sends
tokens as they are sampled, as server-sent events in OpenAI's chunk format ending with
`data: [DONE]`: a batch holding a streaming request decodes --stream_every tokens per compiled
call and sends each streaming request its new text after every call (the first token right
after the prompt's prefill). A sampled completion depends on the batch it joins, so `seed`
makes no promise of repeatable output (greedy output, temperature 0, is repeatable).

Before it takes requests the server compiles the sampler's programs for every shape bucket a
batch of requests of up to --warmup_prompt_tokens prompt tokens and --warmup_new_tokens new
ones can fall in; `/health` answers 503 meanwhile. A request outside those limits waits for a
compilation the first time its bucket is met. --compile_cache=DIR keeps the compiled programs
on disk, so a restarted server warms up from it.
"""

from __future__ import annotations

import os
import sys

import jax
import uvicorn
from absl import flags, logging

from jtrain import checkpoint, cli, generate, pretrained
from jtrain.serving import batcher
from jtrain.serving.app import create_app

__all__ = ["create_app", "model_name"]


def _define_flags() -> None:
    """Defines the CLI flags (jtrain.generate's --model, --step and --quantize, and the
    server's own); only when run as a program, so importing never claims names."""
    generate.define_model_flags()
    flags.DEFINE_string("host", "127.0.0.1", "The address to listen on.")
    flags.DEFINE_integer("port", 8000, "The port to listen on.")
    flags.DEFINE_integer("max_batch", 16, "The most requests decoded together.")
    flags.DEFINE_string(
        "served_model_name", None, "The model's id in the API (default: --model's last part)."
    )
    flags.DEFINE_integer(
        "stream_every", 8, "Tokens decoded per compiled call while a batch streams a request."
    )
    # Completions' default max_tokens is 16; prompts of up to 128 tokens cover most short
    # requests. 5 x 7 x 1 = 35 buckets at --max_batch=16 (lengths 16, 24, 32, 48, 64, 96, 128):
    # seconds each on a CPU, less on an accelerator. Chat requests (256 new tokens unless
    # they say) want --warmup_new_tokens=256.
    flags.DEFINE_integer(
        "warmup_prompt_tokens", 128, "Compile, before serving, for prompts up to this (0: no)."
    )
    flags.DEFINE_integer(
        "warmup_new_tokens", 16, "Compile, before serving, for max_tokens up to this (0: no)."
    )
    flags.DEFINE_string(
        "compile_cache", None, "A directory for XLA's compiled programs, kept across restarts."
    )


def model_name(spec: str) -> str:
    """The API's name for the model `spec` names: a Hub model's id (org/name, as vLLM names
    it), else its directory's last part."""
    repo = pretrained.hub_id(spec) if pretrained.is_hf(spec) else None
    if repo is not None:
        return repo[0]
    path = pretrained.hf_path(spec) if pretrained.is_hf(spec) else spec
    return os.path.basename(os.path.normpath(path))


def main(argv: list[str]) -> None:
    cli.start(argv)
    f = flags.FLAGS
    for name, least in batcher.LEAST.items():  # before the model loads, which takes a while
        if f[name].value < least:
            sys.exit(f"error: --{name}={f[name].value} is invalid: it must be at least {least}")
    if f.compile_cache:
        use_compile_cache(f.compile_cache)
    try:
        generator = generate.load(f.model, step=f.step, quantize=f.quantize)
    except (checkpoint.CheckpointError, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    name = f.served_model_name or model_name(f.model)
    if not f["verbosity"].present:
        logging.set_verbosity(logging.INFO)  # the warm-up's report; the model is loaded
    app = create_app(
        generator, model_name=name, max_batch=f.max_batch, stream_every=f.stream_every,
        warmup_prompt_tokens=f.warmup_prompt_tokens, warmup_new_tokens=f.warmup_new_tokens,
    )  # fmt: skip
    uvicorn.run(app, host=f.host, port=f.port)


def use_compile_cache(directory: str) -> None:
    """Keeps every compiled program in `directory` (however small or quick to compile), so a
    restarted server reads its warm-up from disk."""
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def command() -> None:
    """The `jtrain-serve` command (python -m jtrain.serve)."""
    _define_flags()
    flags.mark_flags_as_required(["model"])
    cli.run(main)


if __name__ == "__main__":
    command()
