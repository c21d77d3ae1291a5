"""Preference pairs: records read in TRL's formats, tokenized as TRL tokenizes them, as arrays.

With `task="dpo"` or `task="reward"`, `data.source` names records (`files:GLOB` JSON Lines or
Parquet, `python:module:function`, a registered set, or a mixture) in one of TRL's preference
formats:

- explicit prompt, text: `{"prompt": str, "chosen": str, "rejected": str}`. As TRL does, EOS
  ends each completion: the prompt is tokenized alone and with each completion, and the
  completion is what follows their common prefix, then EOS. jtrain starts every sequence with
  BOS (TRL adds what the tokenizer's post-processor adds: the same for Llama-style tokenizers).
- explicit prompt, conversational: `{"prompt": [messages], "chosen": [messages], "rejected":
  [messages]}`, rendered with `data.chat_template`: the prompt with the assistant header, then
  the prompt followed by each completion; the completion is what follows the common prefix
  (the builtin template ends an assistant turn with EOS).
- implicit prompt: `{"chosen": ..., "rejected": ...}` (text or messages) whose shared start is
  the prompt, split off as TRL's `extract_prompt` does.

An optional numeric `"margin"` (reward models) is kept; an optional `"split"` is not needed:
without named splits each pair goes to the split of a hash of its content.

Truncation: each sequence (prompt + completion) is cut to `length` tokens keeping its start,
as TRL's `truncation_mode="keep_start"` does. A cut completion loses its end, EOS included:
such pairs are counted and warned about with `file:line` examples, never dropped silently;
a pair whose prompt alone fills `length` has no completion token left and is dropped (counted).
Bad records (not an object, missing or mixed fields, empty completions) are skipped and
counted with `file:line` by the source.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging

import numpy as np

from jtrain.data import sources, tokenizers
from jtrain.data.array_rows import ArrayExamples
from jtrain.data.records import BadRecord, Skipped
from jtrain.tasks import chat, sft_examples
from jtrain.tasks.base import GenerationSet

_log = logging.getLogger(__name__)
_QUOTED = 3


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference record, its prompt split off: text, or chat messages throughout."""

    prompt: str | list[chat.Message]
    chosen: str | list[chat.Message]
    rejected: str | list[chat.Message]
    margin: float = 0.0

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


def source_names() -> tuple[str, ...]:
    """The registered record sets that hold preference pairs."""
    return sources.source_names("preference")


def parse_spec(spec) -> tuple[sources.SourceSpec, ...]:
    """Parses `data.source` for a preference task; a ValueError says what it may be."""
    return sources.parse_record_spec(
        spec, source_names(), "preference pairs (prompt/chosen/rejected)"
    )


def _messages(value, field: str) -> list[chat.Message]:
    if not value or not all(isinstance(m, dict) for m in value):
        raise BadRecord("bad messages", f"{field!r} is not a non-empty list of messages")
    messages = sft_examples.record_messages({"messages": value + _ASSISTANT_PROBE})[:-1]
    return messages


# record_messages requires an assistant turn; a prompt has none, so one is added and removed.
_ASSISTANT_PROBE = [{"role": "assistant", "content": "-"}]


def record_part(record: dict, field: str):
    """A record's field as text or chat messages; BadRecord if it is neither."""
    value = record.get(field)
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord("empty content", f"{field!r} is empty")
        return value
    if isinstance(value, list):
        return _messages(value, field)
    if field not in record:
        raise BadRecord("missing field", f"no {field!r} field")
    kind = type(value).__name__
    raise BadRecord("non-string field", f"{field!r} is {kind}, not text or a list of messages")


def _extract_prompt(chosen, rejected) -> tuple:
    """TRL's `extract_prompt`: the longest shared start (whole messages, or characters up to
    before a space) is the prompt."""
    i = 0
    for i in range(min(len(chosen), len(rejected))):  # noqa: B007 - i is used after the loop
        if chosen[i] != rejected[i]:
            if i and chosen[i - 1] == " ":
                i -= 1
            break
    return chosen[:i], chosen[i:], rejected[i:]


def record_pair(record) -> Pair:
    """The pair in one record; BadRecord says why a record is not one."""
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"a JSON {type(record).__name__}, not an object")
    chosen, rejected = record_part(record, "chosen"), record_part(record, "rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise BadRecord("mixed formats", "'chosen' and 'rejected' must both be text or messages")
    if "prompt" in record:
        prompt = record_part(record, "prompt")
    else:
        prompt, chosen, rejected = _extract_prompt(chosen, rejected)
        if not prompt:
            raise BadRecord("no prompt", "no 'prompt', and chosen and rejected share no start")
    if isinstance(prompt, list) != isinstance(chosen, list):
        raise BadRecord("mixed formats", "'prompt' must be messages when completions are")
    if not chosen or not rejected:
        raise BadRecord("empty content", "a completion is empty once the prompt is split off")
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise BadRecord("bad margin", f"'margin' is {type(margin).__name__}, not a number")
    return Pair(prompt, chosen, rejected, float(margin))


def split_key(record) -> str:
    """The hash that assigns a pair to its split; BadRecord if it is no pair."""
    pair = record_pair(record)
    key = json.dumps([pair.prompt, pair.chosen, pair.rejected], sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class Encoder:
    """A pair -> (prompt ids, chosen completion ids, rejected completion ids)."""

    def __init__(self, tokenizer: str, template: str):
        self.tokenizer = tokenizers.get_tokenizer(tokenizer)
        self.template_spec = (template, tokenizer)

    @functools.cached_property
    def template(self) -> chat.Template:
        return chat.load(*self.template_spec)

    def _ids(self, pieces) -> np.ndarray:
        return chat.encode([pieces], self.tokenizer)[0][0]

    def __call__(self, pair: Pair) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if pair.conversational:
            prompt = self._ids(self.template.prompt_pieces(pair.prompt))
            full = [
                self._ids(self.template.pieces(pair.prompt + c))
                for c in (pair.chosen, pair.rejected)
            ]
        else:
            encode = functools.partial(self.tokenizer.encode, add_bos=True, add_eos=False)
            prompt = encode(pair.prompt)
            full = [self._with_eos(encode(pair.prompt + c)) for c in (pair.chosen, pair.rejected)]
        start = min(_common_prefix(prompt, f) for f in full)
        chosen, rejected = (f[start:].astype(np.int32) for f in full)
        return prompt[:start].astype(np.int32), chosen, rejected

    def _with_eos(self, ids: np.ndarray) -> np.ndarray:
        """`ids` ending with EOS: added unless the text already ends with it (as TRL's add_eos)."""
        eos = int(self.tokenizer.eos_id)
        return ids if ids.size > 1 and ids[-1] == eos else np.append(ids, np.int32(eos))


@dataclasses.dataclass
class _Report:
    """Pairs of one source that the template refused, or that were cut or dropped, with a
    few of each quoted by `file:line`."""

    pairs: int = 0
    truncated: int = 0
    dropped: int = 0
    quoted: list[str] = dataclasses.field(default_factory=list)
    refused: Skipped = dataclasses.field(default_factory=Skipped)

    def cut(self, where: str, *, dropped: bool) -> None:
        if dropped:
            self.dropped += 1
        else:
            self.truncated += 1
        if len(self.quoted) < _QUOTED:
            self.quoted.append(where)

    def warn(self, name: str, length: int) -> None:
        # The source has warned about its bad records already; these come to light here.
        if self.refused.total:
            _log.warning("data.source %s: %s", name, self.refused.summary())
        if self.truncated or self.dropped:
            _log.warning(
                "data.source %s: %d of %d pairs are longer than %d tokens and were cut to "
                "their start, so a completion lost its end (EOS included); %d pairs whose "
                "prompt alone fills %d tokens were dropped; e.g. %s. Raise train.seq_len to "
                "keep whole pairs.",
                name, self.truncated, self.pairs, length, self.dropped, length,
                "; ".join(self.quoted),
            )  # fmt: skip


def _pack(prompt, chosen, rejected, length: int, pad_id: int):
    """[2, length] tokens and completion masks (chosen, rejected) and the real lengths."""
    tokens = np.full((2, length), pad_id, np.int32)
    completion = np.zeros((2, length), np.float32)
    lengths = np.zeros(2, np.int32)
    for row, answer in enumerate((chosen, rejected)):
        ids = np.concatenate([prompt, answer])[:length]
        tokens[row, : ids.size] = ids
        completion[row, prompt.size : ids.size] = 1.0
        lengths[row] = ids.size
    return tokens, completion, lengths


def _encode_split(records, encoder: Encoder, length: int, report: _Report) -> ArrayExamples:
    pad_id = int(encoder.tokenizer.pad_id)
    columns = {"tokens": [], "completion": [], "lengths": [], "margin": []}
    for i, record in enumerate(records):
        pair = record_pair(record)
        try:
            prompt, chosen, rejected = encoder(pair)
        except chat.RenderError as err:
            report.refused.add(records.where(i), "template error", str(err))
            continue
        report.pairs += 1
        if prompt.size + max(chosen.size, rejected.size) > length:
            report.cut(records.where(i), dropped=prompt.size >= length)
        if prompt.size >= length:
            continue
        tokens, completion, lengths = _pack(prompt, chosen, rejected, length, pad_id)
        for name, value in zip(columns, (tokens, completion, lengths, pair.margin), strict=True):
            columns[name].append(value)
    shapes = {"tokens": (2, length), "completion": (2, length), "lengths": (2,), "margin": ()}
    dtypes = {"tokens": np.int32, "completion": np.float32, "lengths": np.int32}
    return ArrayExamples(
        {
            name: np.asarray(values, dtypes.get(name, np.float32)).reshape(-1, *shapes[name])
            for name, values in columns.items()
        }
    )


@functools.cache
def _encoded(kind: str, target: str, tokenizer: str, template: str, length: int):
    item = sources.SourceSpec(kind, target)
    encoder, report = Encoder(tokenizer, template), _Report()
    out = {
        split: _encode_split(sources.load_records(item, split, split_key), encoder, length, report)
        for split in sources.SPLITS
    }
    report.warn(str(item), length)
    return out


def load_pairs(
    item: sources.SourceSpec, split: str, tokenizer: str, template: str, length: int
) -> ArrayExamples:
    """One split of one source as arrays: `tokens` and `completion` [N, 2, length] (row 0 the
    chosen sequence, row 1 the rejected), `lengths` [N, 2] (real tokens), `margin` [N]."""
    return _encoded(item.kind, item.target, tokenizer, template, length)[split]


def content_hash(pairs: ArrayExamples) -> str:
    """sha256 of a split's token ids and completion masks (what a model's log-probs of its
    pairs depend on), shapes included."""
    digest = hashlib.sha256()
    for name in ("tokens", "completion"):
        array = np.ascontiguousarray(pairs.features[name])
        digest.update(f"{name} {array.dtype} {array.shape};".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _text(part) -> str:
    """A completion as text: the string, or its last assistant message's content."""
    return part if isinstance(part, str) else part[-1]["content"]


def generation_set(specs, split: str, tokenizer: str, template: str, limit: int):
    """Up to `limit` prompts of a split, each pair's chosen completion the reference."""
    encoder = Encoder(tokenizer, template)
    prompts, references, stops = [], [], {int(encoder.tokenizer.eos_id)}
    for item in specs:
        for record in sources.load_records(item, split, split_key):
            if len(prompts) == limit:
                break
            pair = record_pair(record)
            try:
                prompt, _, _ = encoder(pair)
            except chat.RenderError:  # counted and warned about when the split was encoded
                continue
            prompts.append(prompt.tolist())
            references.append(_text(pair.chosen))
            if pair.conversational:  # the template's end-of-turn ends an answer too
                stops.add(int(encoder.template.stop_id))
    return GenerationSet(prompts, references, tuple(sorted(stops)), encoder.tokenizer.decode)
