"""Compiles the sampler's shape buckets before a server takes requests.

The sampler compiles one prefill and one decode program per bucket of (rows, prompt tokens,
new tokens), rows rounded up to a power of two and lengths to 16, 24, 32, 48, ...
(`jtrain.sampler.rows_bucket`, `length_bucket`). Without a warm-up the
first request of every bucket waits for both; `buckets` lists every bucket a batch of requests
within the given limits can fall in, and `compile_bucket` compiles one by decoding a token of a
batch of that shape with the settings the server decodes with.
"""

from __future__ import annotations

from collections.abc import Sequence

from jtrain.sampler import Sampler, fewest_in, length_buckets, rows_bucket


def buckets(
    max_batch: int, prompt_tokens: int, new_tokens: int, max_len: int | None
) -> list[tuple[int, int, int]]:
    """Every (rows, prompt, new tokens) bucket of a batch of at most `max_batch` requests with
    prompts of at most `prompt_tokens` and at most `new_tokens` each, that fits `max_len`."""
    if prompt_tokens < 1 or new_tokens < 1:
        return []
    return [
        (rows, prompt, new)
        for rows in [1 << e for e in range(rows_bucket(max_batch).bit_length())]
        for prompt in length_buckets(prompt_tokens)
        for new in length_buckets(new_tokens)
        if not max_len or fewest_in(prompt) + fewest_in(new) <= max_len
    ]


def compile_bucket(sampler: Sampler, shape: tuple[int, int, int], stop_ids: Sequence[int]) -> None:
    """Compiles the prefill and decode programs of one bucket (a short decode of dummy rows)."""
    rows, prompt, new = shape
    decoding = sampler.start(
        [[0] * fewest_in(prompt)] * rows,
        max_new_tokens=fewest_in(new),
        stop_ids=stop_ids,
        temperature=[0.0] * rows,
        top_k=0,
        top_p=[1.0] * rows,
    )
    decoding.advance(1)
