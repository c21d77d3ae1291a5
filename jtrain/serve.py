r"""Serves a jtrain run or a Hugging Face model over OpenAI's HTTP API.

    python -m jtrain.serve --model=RUN_DIR|hf:PATH|hf:ORG/NAME[@REVISION] [--host=127.0.0.1 \
        --port=8000 --quantize=none|int8 --max_batch=16 --step=N --served_model_name=NAME]

Routes: `POST /v1/completions` (prompt: text, encoded after BOS, or token ids),
`POST /v1/chat/completions` (messages rendered with the model's chat template), `GET /v1/models`
(one model, named --served_model_name, else after --model's Hub id or directory) and
`GET /health`; the official `openai` clients work unchanged. Supported request fields: model,
prompt/messages, max_tokens (chat: or max_completion_tokens), temperature (0 = greedy), top_p,
stop (strings that are one token each), seed, stream and stream_options.include_usage; n must
be 1. A bad request gets a 4xx and OpenAI's error body, naming the field and what is allowed.

Concurrent requests are decoded together: one worker thread takes up to --max_batch waiting
requests and runs one `jtrain.sampler.Sampler.generate` over them, each row with its own
temperature and top-p; requests arriving meanwhile wait for the next batch. The sampler decodes
in one compiled loop, so `stream=true` sends the finished completion as server-sent events
(one chunk per token, in OpenAI's chunk format, ending with `data: [DONE]`) once its batch is
done, not token by token as they are sampled. A sampled completion depends on the batch it
joins, so `seed` makes no promise of repeatable output (greedy output, temperature 0, is
repeatable). The first request of each new shape bucket waits for a compilation.
"""

from __future__ import annotations

import os
import sys

import uvicorn
from absl import flags

from jtrain import checkpoint, cli, generate, pretrained
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
    if f.max_batch < 1:
        sys.exit(f"error: --max_batch={f.max_batch} is invalid: it must be at least 1")
    try:
        generator = generate.load(f.model, step=f.step, quantize=f.quantize)
    except (checkpoint.CheckpointError, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    name = f.served_model_name or model_name(f.model)
    uvicorn.run(
        create_app(generator, model_name=name, max_batch=f.max_batch), host=f.host, port=f.port
    )


def command() -> None:
    """The `jtrain-serve` command (python -m jtrain.serve)."""
    _define_flags()
    flags.mark_flags_as_required(["model"])
    cli.run(main)


if __name__ == "__main__":
    command()
