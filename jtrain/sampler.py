"""Batched sampling from a decoder with a KV cache: one prefill pass, one compiled decode loop.

Prompts of different lengths are left-padded into one [B, P] batch; every row's positions
count its own tokens only (so padding never shifts RoPE or learned positions), and a key slot
is attended to only if it holds a real token at or before the query and, with a sliding
window, within it. The prompt is prefilled in one forward pass that writes every layer's keys
and values into the cache; then a `lax.while_loop` on the device decodes one token per
iteration for every row until each has met a stop token or the row's token budget.

Shapes are bucketed (the batch rounded up to a power of two, prompt and new-token lengths to
16, 24, 32, 48, 64, 96, ...), so a stream of requests compiles once per bucket. Every row
has its own temperature, top-k and top-p, so requests with different settings share a batch.
Each sampled token comes with its log-probability under the sampling distribution (the logits
divided by the temperature, before top-k/top-p truncation): what an RL loss needs, equal to
the training forward pass's. `Sampler.start` prefills; `Decoding.advance` decodes a given
number of tokens per call, which is how a server streams them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtrain.models.layers import KVCache
from jtrain.models.transformer import DTYPES

_LENGTH_GRID = (16, 24)  # length buckets: these times the powers of two


def rows_bucket(n: int) -> int:
    """The padded number of rows: the power of two at least n (batches divide evenly over
    the data axes of any mesh)."""
    return 1 << (max(n, 1) - 1).bit_length()


def length_bucket(n: int) -> int:
    """The padded size of a prompt or of a number of new tokens: the least of 16, 24, 32, 48,
    64, 96, ... (a power of two or 1.5 times one) that holds n. At most a third of a bucket is
    padding, where powers of two alone waste up to half of the prefill's work."""
    octave = 1
    while True:
        for size in _LENGTH_GRID:
            if n <= size * octave:
                return size * octave
        octave *= 2


def length_buckets(n: int) -> list[int]:
    """Every length bucket up to `length_bucket(n)`, smallest first."""
    sizes = [length_bucket(1)]
    while sizes[-1] < length_bucket(n):
        sizes.append(length_bucket(sizes[-1] + 1))
    return sizes


def fewest_in(size: int) -> int:
    """The fewest tokens that fall in the length bucket `size`."""
    smaller = [s for s in length_buckets(size) if s < size]
    return smaller[-1] + 1 if smaller else 1


@dataclasses.dataclass(frozen=True)
class Completion:
    """One row's result: the new tokens (a stop token included), their log-probabilities,
    and why it ended: "stop" (a stop token) or "length" (max_new_tokens reached)."""

    tokens: np.ndarray  # int32[n]
    logprobs: np.ndarray  # float32[n]
    finish_reason: str


def sample_tokens(logits_BxV, rng, temperature_B, top_k_B, top_p_B):
    """(token, log-probability) per row: greedy where the temperature is 0, else sampled from
    the logits / temperature kept to the top_k (0 = all) and the top_p probability mass.

    Sorting and drawing are slow on some backends (a few ms a step on XLA:CPU), so each runs
    only when some row of the batch needs it.
    """
    greedy_B = temperature_B <= 0
    scaled_BxV = logits_BxV / jnp.where(greedy_B, 1.0, temperature_B)[:, None]
    argmax_B = _argmax(logits_BxV)

    def draw(_):
        truncate = jnp.any(top_k_B > 0) | jnp.any(top_p_B < 1)
        keep_BxV = jax.lax.cond(
            truncate,
            _kept,
            lambda *_: jnp.ones(scaled_BxV.shape, bool),
            scaled_BxV,
            top_k_B,
            top_p_B,
        )
        sampled_B = jax.random.categorical(rng, jnp.where(keep_BxV, scaled_BxV, -jnp.inf))
        return jnp.where(greedy_B, argmax_B, sampled_B).astype(jnp.int32)

    token_B = jax.lax.cond(jnp.all(greedy_B), lambda _: argmax_B, draw, None)
    logprobs_BxV = jax.nn.log_softmax(scaled_BxV, axis=-1)
    return token_B, jnp.take_along_axis(logprobs_BxV, token_B[:, None], -1)[:, 0]


def _argmax(logits_BxV):
    """jnp.argmax over the last axis (the first maximum; the first NaN if any) as a max and a
    min: XLA:CPU's argmax, one reduction of (value, index) pairs, took 5x as long, a tenth of
    a batch-16 decoding step of the default model."""
    vocab_V = jnp.arange(logits_BxV.shape[-1], dtype=jnp.int32)
    top_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    hit_BxV = (logits_BxV == top_Bx1) | jnp.isnan(logits_BxV)
    return jnp.min(jnp.where(hit_BxV, vocab_V, logits_BxV.shape[-1]), axis=-1)


def _kept(scaled_BxV, top_k_B, top_p_B):
    """Which tokens survive top-k (0 = all) and top-p (the smallest prefix of the sorted
    distribution whose mass reaches p)."""
    descending_BxV = -jnp.sort(-scaled_BxV, axis=-1)
    vocab = scaled_BxV.shape[-1]
    kth_B = jnp.take_along_axis(descending_BxV, (jnp.clip(top_k_B, 1, vocab) - 1)[:, None], -1)
    kth_B = jnp.where(top_k_B[:, None] > 0, kth_B, -jnp.inf)
    mass_BxV = jnp.cumsum(jax.nn.softmax(descending_BxV, axis=-1), axis=-1)
    last_B = jnp.sum(mass_BxV < top_p_B[:, None], axis=-1, keepdims=True)
    nucleus_B = jnp.take_along_axis(descending_BxV, jnp.minimum(last_B, vocab - 1), -1)
    return (scaled_BxV >= kth_B) & (scaled_BxV >= nucleus_B)


def _attend_mask(slots_T, key_valid_BxS, key_pos_BxS, query_pos_BxT, window: int):
    """[B, 1, T, S]: a query may see real keys at or before its slot (and within the window)."""
    slots_S = jnp.arange(key_valid_BxS.shape[1])
    mask = key_valid_BxS[:, None, :] & (slots_S[None, None, :] <= slots_T[None, :, None])
    if window:
        mask &= query_pos_BxT[:, :, None] - key_pos_BxS[:, None, :] < window
    return mask[:, None]


@flax.struct.dataclass
class _Loop:
    """The decode loop's state between calls: `step` tokens sampled per row so far, every
    layer's cache, the tokens and log-probabilities so far, which rows are done, and what the
    rows were asked for. Donated to each decode call, so the caches are updated in place."""

    step: jax.Array
    kv: list
    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    done_B: jax.Array
    lengths_B: jax.Array
    max_new: jax.Array
    stops: jax.Array
    temperature_B: jax.Array
    top_k_B: jax.Array
    top_p_B: jax.Array
    rng: jax.Array


def _slots(lengths_B, prompt_len: int, slots: int):
    """Which of `slots` cache slots hold real tokens ([B, S]) and their positions ([B, S])."""
    slots_S = jnp.arange(slots)
    pads_B = prompt_len - lengths_B
    return slots_S[None, :] >= pads_B[:, None], jnp.maximum(slots_S[None, :] - pads_B[:, None], 0)


def _prefill(state, prompts_BxP, lengths_B, max_new, stops, temperature_B, top_k_B, top_p_B,
             rng, *, graphdef, new_bucket: int) -> _Loop:  # fmt: skip
    """Every prompt in one forward pass that fills the caches, and each row's first token."""
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    batch, prompt_len = prompts_BxP.shape
    key_valid_BxP, key_pos_BxP = _slots(lengths_B, prompt_len, prompt_len)
    mask = _attend_mask(
        jnp.arange(prompt_len), key_valid_BxP, key_pos_BxP, key_pos_BxP, cfg.sliding_window
    )
    # The prompt attends over its own slots only (keys and values in the compute dtype, one
    # pair of buffers per layer); the caches grow to their decoding length after.
    dtype, heads, width = DTYPES[cfg.dtype], cfg.n_kv_heads, cfg.head_dim
    k = jnp.zeros((batch, heads, width, prompt_len), dtype)  # KVCache's layouts
    v = jnp.zeros((batch, heads, prompt_len, width), dtype)
    caches = [KVCache(k, v, jnp.zeros((), jnp.int32), mask)] * cfg.n_layers
    hidden, caches = model.decode(prompts_BxP, key_pos_BxP, caches)
    token_B, logprob_B = sample_tokens(
        model.logits(hidden[:, -1:])[:, 0], jax.random.fold_in(rng, 0), temperature_B, top_k_B,
        top_p_B,
    )  # fmt: skip
    more = (0, new_bucket)
    return _Loop(
        step=jnp.ones((), jnp.int32),
        kv=[(jnp.pad(c.k, ((0, 0),) * 3 + (more,)), jnp.pad(c.v, ((0, 0),) * 2 + (more, (0, 0))))
            for c in caches],
        tokens_BxN=jnp.zeros((batch, new_bucket), jnp.int32).at[:, 0].set(token_B),
        logprobs_BxN=jnp.zeros((batch, new_bucket), jnp.float32).at[:, 0].set(logprob_B),
        done_B=jnp.isin(token_B, stops),
        lengths_B=lengths_B, max_new=max_new, stops=stops, temperature_B=temperature_B,
        top_k_B=top_k_B, top_p_B=top_p_B, rng=rng,
    )  # fmt: skip


def _decode(state, loop: _Loop, until, *, graphdef) -> _Loop:
    """One token per iteration for every row, in one `lax.while_loop`, until `until` tokens
    are sampled, every row is done, or the budget is spent."""
    model = nnx.merge(graphdef, state)
    slots = loop.kv[0][1].shape[2]  # the values' [B, G, S, K]
    prompt_len = slots - loop.tokens_BxN.shape[1]
    key_valid_BxS, key_pos_BxS = _slots(loop.lengths_B, prompt_len, slots)
    end = jnp.minimum(loop.max_new, until)
    blocks = model.layer_blocks()  # sliced once, outside the loop

    def more(loop):
        return (loop.step < end) & ~jnp.all(loop.done_B)

    window = model.cfg.sliding_window

    def step(loop):
        i = loop.step
        slot = prompt_len + i - 1  # where the last sampled token's key and value go
        pos_Bx1 = (loop.lengths_B + i - 1)[:, None]
        mask = _attend_mask(slot[None], key_valid_BxS, key_pos_BxS, pos_Bx1, window)
        last_Bx1 = jax.lax.dynamic_slice_in_dim(loop.tokens_BxN, i - 1, 1, axis=1)
        caches = [KVCache(k, v, slot, mask) for k, v in loop.kv]
        hidden, caches = model.decode(last_Bx1, pos_Bx1, caches, blocks)
        token_B, logprob_B = sample_tokens(
            model.logits(hidden)[:, 0], jax.random.fold_in(loop.rng, i), loop.temperature_B,
            loop.top_k_B, loop.top_p_B,
        )  # fmt: skip
        token_B = jnp.where(loop.done_B, 0, token_B)
        logprob_B = jnp.where(loop.done_B, 0.0, logprob_B)
        write = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=i, axis=1)
        return loop.replace(
            step=i + 1,
            kv=[(c.k, c.v) for c in caches],
            tokens_BxN=write(loop.tokens_BxN, token_B[:, None]),
            logprobs_BxN=write(loop.logprobs_BxN, logprob_B[:, None]),
            done_B=loop.done_B | jnp.isin(token_B, loop.stops),
        )

    return jax.lax.while_loop(more, step, loop)


class Sampler:
    """Generates completions of token prompts with a model that has `decode` and `logits`."""

    def __init__(self, model: nnx.Module):
        self.graphdef, self.state = nnx.split(model)
        self.max_len = model.cfg.max_seq_len or None  # learned positions end somewhere
        self._prefill = jax.jit(
            functools.partial(_prefill, graphdef=self.graphdef), static_argnames="new_bucket"
        )
        self._decode = jax.jit(functools.partial(_decode, graphdef=self.graphdef), donate_argnums=1)
        self.buckets: set[tuple[int, int, int]] = set()  # (rows, prompt, new tokens) compiled

    def compilations(self) -> int:
        """How many shape buckets have been compiled so far (each bucket compiles one prefill
        and one decode program)."""
        return self._prefill._cache_size()

    def generate(self, prompts: Sequence[Sequence[int]], **settings) -> list[Completion]:
        """Completes every prompt; `settings` are `start`'s."""
        decoding = self.start(prompts, **settings)
        decoding.advance(decoding.max_new_tokens)
        return decoding.completions()

    def start(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        temperature: float | Sequence[float] = 0.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        seed: int = 0,
    ) -> Decoding:
        """Prefills every prompt and samples its first token; `Decoding.advance` samples the
        rest. Settings are one value or one per prompt."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        longest = max(len(p) for p in prompts)
        if self.max_len and longest + max_new_tokens > self.max_len:
            raise ValueError(
                f"a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds the "
                f"model's {self.max_len} positions"
            )
        rows, width = rows_bucket(len(prompts)), length_bucket(longest)
        prompts_BxP = np.zeros((rows, width), np.int32)
        lengths_B = np.ones(rows, np.int32)  # padding rows: one token, decoded and dropped
        for i, prompt in enumerate(prompts):
            prompts_BxP[i, width - len(prompt) :] = prompt
            lengths_B[i] = len(prompt)
        per_row = functools.partial(_per_row, rows=rows, count=len(prompts))
        new_bucket = length_bucket(max_new_tokens)
        self.buckets.add((rows, width, new_bucket))
        loop = self._prefill(
            self.state,
            prompts_BxP,
            lengths_B,
            np.int32(max_new_tokens),
            np.asarray(list(stop_ids) or [-1], np.int32),
            per_row(temperature, np.float32),
            per_row(top_k, np.int32),
            per_row(top_p, np.float32),
            jax.random.key(seed),
            new_bucket=new_bucket,
        )
        return Decoding(self, loop, len(prompts), max_new_tokens, stop_ids)


class Decoding:
    """A batch being decoded. `advance(n)` samples up to n more tokens per row in one compiled
    loop and returns each row's tokens new since the last call (what a stream sends);
    `completions()` gives the results once `finished`."""

    def __init__(self, sampler: Sampler, loop: _Loop, count: int, max_new: int, stop_ids):
        self._sampler, self._loop, self._count = sampler, loop, count
        self.max_new_tokens, self._stop_ids = max_new, list(stop_ids)
        self._sent = [0] * count  # tokens of each row returned so far
        self._ends: list[tuple[int, str] | None] = [None] * count  # (length, finish reason)
        self._tokens = self._logprobs = None  # the host's copy after the last advance

    @property
    def finished(self) -> bool:
        """Every row has met a stop token or its budget."""
        return all(end is not None for end in self._ends)

    def advance(self, tokens: int) -> list[np.ndarray]:
        """Samples up to `tokens` more per row (0: none, only what the last call left), and
        returns each row's new tokens (a stop token included; nothing once a row ended)."""
        if tokens > 0 and not self.finished:
            until = np.int32(min(int(self._loop.step) + tokens, self.max_new_tokens))
            self._loop = self._sampler._decode(self._sampler.state, self._loop, until)
        step = int(self._loop.step)
        self._tokens = np.asarray(self._loop.tokens_BxN)
        self._logprobs = np.asarray(self._loop.logprobs_BxN)
        new = []
        for row in range(self._count):
            if self._ends[row] is None:
                stops = np.flatnonzero(np.isin(self._tokens[row, :step], self._stop_ids))
                if stops.size:
                    self._ends[row] = (int(stops[0]) + 1, "stop")
                elif step >= self.max_new_tokens:
                    self._ends[row] = (self.max_new_tokens, "length")
            end = step if self._ends[row] is None else self._ends[row][0]
            new.append(self._tokens[row, self._sent[row] : end].astype(np.int32))
            self._sent[row] = end
        return new

    def completions(self) -> list[Completion]:
        """Every row's result; call once `finished`."""
        if not self.finished:
            raise RuntimeError("the batch is still decoding: advance it until finished")
        return [
            Completion(self._tokens[i, :end].astype(np.int32), self._logprobs[i, :end], reason)
            for i, (end, reason) in enumerate(self._ends)
        ]


def _per_row(value, dtype, *, rows: int, count: int) -> np.ndarray:
    values = np.broadcast_to(np.asarray(value, dtype), (count,))
    return np.concatenate([values, np.full(rows - count, values[0], dtype)])
