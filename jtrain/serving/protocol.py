"""OpenAI request bodies in, checked `Request`s out; what is wrong comes back as an `ApiError`.

A body is checked whole before it joins a batch: the model it names, the prompt (text encoded
after BOS, token ids as given, or chat messages rendered with the model's chat template, all by
`jtrain.generate.Generator.prompt_ids`), the sampling settings and the room left in the model's
positions. Fields of OpenAI's API that this server does not implement are refused rather than
ignored, unless they hold the value that means "off".
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jtrain import generate

# The most new tokens a request may ask of a model without a position limit (RoPE).
MAX_TOKENS_LIMIT = 4096
# max_tokens when a request leaves it out: OpenAI's 16 for completions; for chat (unlimited at
# OpenAI) this many, or the positions the model has left.
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}
# Fields this server does not implement, with the value that means "off".
_UNSUPPORTED = {
    "best_of": 1,
    "echo": False,
    "logprobs": False,
    "top_logprobs": 0,
    "suffix": None,
    "logit_bias": None,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "tools": None,
    "functions": None,
    "response_format": {"type": "text"},
}


class ApiError(Exception):
    """A refused request: its HTTP status and the message and field for OpenAI's error body."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def body(self) -> dict:
        """OpenAI's error shape."""
        return error_body(self.message, self.param)


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error"):
    """`{"error": {...}}` as OpenAI writes it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked request: what to complete and how."""

    prompt_ids: np.ndarray  # int32[n]
    max_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    stop_ids: tuple[int, ...]  # the request's own stop tokens, besides the model's
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def parse(body, kind: str, generator: generate.Generator, model_name: str) -> Request:
    """The `Request` of a decoded JSON body; `kind` is "completion" or "chat"."""
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {_kind(body)}")
    _check_model(body, model_name)
    _check_unsupported(body)
    field = "messages" if kind == "chat" else "prompt"
    ids = _chat_ids(body, generator) if kind == "chat" else _completion_ids(body, generator)
    max_tokens = _max_tokens(body, kind, field, ids.size, generator.sampler.max_len)
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0:
        raise ApiError(
            f"temperature={temperature} is invalid: it must be >= 0 (0 = greedy)",
            param="temperature",
        )
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(f"top_p={top_p} is invalid: it must be in (0, 1]", param="top_p")
    seed = _integer(body, "seed", None)
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError("stream_options must be an object", param="stream_options")
    include_usage = _boolean(options or {}, "include_usage", False, name_prefix="stream_options.")
    return Request(
        prompt_ids=ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_ids=_stop_ids(body.get("stop"), generator.tokenizer),
        seed=None if seed is None else seed % 2**63,
        stream=stream,
        include_usage=include_usage,
    )


def _check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(f"model is required: this server serves {model_name!r}", param="model")
    if model != model_name:
        raise ApiError(
            f"The model {model!r} does not exist: this server serves {model_name!r}",
            param="model",
            status=404,
        )


def _check_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(
            f"n={n!r} is not supported: this server returns one choice per request; send n "
            "requests instead (concurrent requests are decoded together)",
            param="n",
        )
    for name, off in _UNSUPPORTED.items():
        value = body.get(name)
        if not (value is None or value == off or (not value and not off)):
            raise ApiError(f"{name}={value!r} is not supported by this server", param=name)


def _completion_ids(body: dict, generator: generate.Generator) -> np.ndarray:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not _is_int(prompt[0]):
        prompt = prompt[0]  # a batch of one prompt: ["text"] or [[ids]]
    if isinstance(prompt, str):
        return _encoded(generator, {"prompt": prompt}, "prompt")
    if isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
        return _encoded(generator, {"prompt_ids": prompt}, "prompt")
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(
            "prompt holds several prompts: send one per request (concurrent requests are "
            "decoded together)",
            param="prompt",
        )
    raise ApiError(
        f"prompt must be a string or a non-empty list of token ids, not {_kind(prompt)}",
        param="prompt",
    )


def _chat_ids(body: dict, generator: generate.Generator) -> np.ndarray:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of messages", param="messages")
    return _encoded(generator, {"messages": [_message(m) for m in messages]}, "messages")


def _message(message):
    """A message as the chat template takes it: text parts joined, "developer" as "system"."""
    if not isinstance(message, dict):
        return message  # the template's check names it
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise ApiError("only text content parts are supported", param="messages")
        content = "".join(texts)
    role = "system" if message.get("role") == "developer" else message.get("role")
    return {"role": role, "content": content}


def _encoded(generator: generate.Generator, line: dict, field: str) -> np.ndarray:
    try:
        return generator.prompt_ids(line, 0)  # the room for new tokens is checked after
    except generate.LineError as err:
        raise ApiError(str(err), param=field) from None


def _max_tokens(body: dict, kind: str, field: str, prompt: int, max_len: int | None) -> int:
    name = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"  # chat's newer name; max_tokens is deprecated there
    room = max_len - prompt if max_len else MAX_TOKENS_LIMIT
    if max_len and room < 1:
        raise ApiError(
            f"the prompt's {prompt} tokens fill the model's {max_len} positions; shorten it",
            param=field,
        )
    value = _integer(body, name, None)
    if value is None:
        return min(DEFAULT_MAX_TOKENS[kind], room)
    if value < 1:
        raise ApiError(f"{name}={value} is invalid: it must be at least 1", param=name)
    if value > room:
        limit = (
            f"the prompt's {prompt} tokens plus {name}={value} exceed the model's {max_len} "
            f"positions; shorten the prompt or lower {name} to at most {room}"
            if max_len
            else f"{name}={value} is more than this server's limit of {MAX_TOKENS_LIMIT}"
        )
        raise ApiError(limit, param=name)
    return value


def _stop_ids(stop, tokenizer) -> tuple[int, ...]:
    """The token ids of the stop strings; each must be exactly one token."""
    if stop is None:
        return ()
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
        raise ApiError("stop must be a non-empty string or a list of them", param="stop")
    ids = []
    for text in strings:
        encoded = tokenizer.encode(text, add_bos=False, add_eos=False)
        if encoded.size != 1:
            raise ApiError(
                f"stop={text!r} is {encoded.size} tokens of the model's tokenizer; this server "
                "stops only on strings that are exactly one token",
                param="stop",
            )
        ids.append(int(encoded[0]))
    return tuple(ids)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise ApiError(f"{name} must be a finite number, not {value!r}", param=name)
    return float(value)


def _integer(body: dict, name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise ApiError(f"{name} must be an integer, not {value!r}", param=name)
    return value


def _boolean(body: dict, name: str, default: bool, *, name_prefix: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false, not {value!r}", param=name_prefix + name)
    return value


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), repr(value))
