"""Compiles the sampler's shape buckets before a server takes requests.

The sampler compiles one prefill and one decode program per bucket of (rows, prompt tokens,
new tokens), each rounded up to a power of two (`jtrain.sampler.bucket`). Without a warm-up the
first request of every bucket waits for both; `buckets` lists every bucket a batch of requests
within the given limits can fall in, and `compile_bucket` compiles one by decoding a token of a
batch of that shape with the settings the server decodes with.
"""

from __future__ import annotations

from collections.abc import Sequence

from jtrain.sampler import Sampler, bucket


def _powers(low: int, high: int) -> list[int]:
    return [1 << e for e in range(low.bit_length() - 1, high.bit_length())]


def _fewest(size: int) -> int:
    """The fewest tokens that fall in the bucket `size`."""
    return 1 if size == bucket(1) else size // 2 + 1


def buckets(
    max_batch: int, prompt_tokens: int, new_tokens: int, max_len: int | None
) -> list[tuple[int, int, int]]:
    """Every (rows, prompt, new tokens) bucket of a batch of at most `max_batch` requests with
    prompts of at most `prompt_tokens` and at most `new_tokens` each, that fits `max_len`."""
    if prompt_tokens < 1 or new_tokens < 1:
        return []
    return [
        (rows, prompt, new)
        for rows in _powers(1, bucket(max_batch, 1))
        for prompt in _powers(bucket(1), bucket(prompt_tokens))
        for new in _powers(bucket(1), bucket(new_tokens))
        if not max_len or _fewest(prompt) + _fewest(new) <= max_len
    ]


def compile_bucket(sampler: Sampler, shape: tuple[int, int, int], stop_ids: Sequence[int]) -> None:
    """Compiles the prefill and decode programs of one bucket (a short decode of dummy rows)."""
    rows, prompt, new = shape
    decoding = sampler.start(
        [[0] * _fewest(prompt)] * rows,
        max_new_tokens=_fewest(new),
        stop_ids=stop_ids,
        temperature=[0.0] * rows,
        top_k=0,
        top_p=[1.0] * rows,
    )
    decoding.advance(1)
