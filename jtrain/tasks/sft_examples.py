"""Supervised fine-tuning examples: conversations read, rendered, tokenized and loss-masked.

With `task="sft"`, `data.source` names records (`jtrain.data.sources`): `files:GLOB` (JSON Lines
or Parquet, optionally compressed, or per-split globs), `python:module:function`, a registered
example set (`python_docstrings`), or a weighted mixture. A record is `{"prompt": ...,
"response": ...}` with an optional "system", or OpenAI-style `{"messages": [{"role":
"system"|"user"|"assistant", "content": ...}, ...]}`. Without named splits, each example goes
to the split of a hash of its messages (`split_key`).

An example is rendered with `data.chat_template` (see `chat`) into token ids and a loss weight
per token: 1 on every assistant turn's content and end-of-turn token, 0 on everything else.
An example longer than train.seq_len + 1 tokens keeps its start; one left without a response
token is dropped. Bad records (malformed JSON, missing or non-string fields, unknown roles, no
assistant turn, empty content) are skipped and counted by the source; conversations the
template refuses, truncated and dropped examples are counted here. Both warn with `file:line`
examples, once per process and source.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging

from jtrain.data import sources, tokenizers
from jtrain.data.documents import WeightedDocuments
from jtrain.data.records import BadRecord
from jtrain.tasks import chat

Example = tuple[str, list[chat.Message]]  # (where it came from: file:line or name, messages)
_QUOTED = 3  # bad records quoted in a warning
_ENCODE_CHUNK = 1024  # conversations tokenized per batch call
_log = logging.getLogger(__name__)


def source_names() -> tuple[str, ...]:
    """The registered example sets `data.source` may name with task=sft."""
    return sources.source_names("chat")


def parse_spec(spec) -> tuple[sources.SourceSpec, ...]:
    """Parses `data.source` for task=sft; a ValueError says what an SFT source may be."""
    allowed = (
        f"with task='sft' it names chat examples: {', '.join(source_names())}, files:GLOB "
        "(JSON Lines or Parquet records with prompt/response or messages), "
        "python:module.path:function, or a weighted mixture such as "
        "'python_docstrings=0.5,files:chats/*.jsonl=0.5'"
    )
    try:
        specs = sources.parse_spec(spec, names=source_names())
    except ValueError as err:  # the problem from the text-source parser, our allowed values
        raise ValueError(f"{str(err).split('; allowed: ')[0]}; {allowed}.") from None
    for item in specs:
        if item.kind == "prepared":
            raise ValueError(
                f"data.source={spec!r}: {item} holds token documents without loss masks; {allowed}."
            )
    return specs


def validate(source: str, tokenizer: str, chat_template: str) -> tuple[sources.SourceSpec, ...]:
    """Checks the data.* values of an SFT run without reading examples; returns the specs."""
    specs = parse_spec(source)
    for item in specs:
        sources.check(item, source)
    chat.load(chat_template, tokenizer)
    return specs


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if key not in record:
        raise BadRecord("missing field", f"no {key!r} field")
    if not isinstance(value, str):
        raise BadRecord("non-string field", f"{key!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise BadRecord("empty content", f"{key!r} is empty")
    return value


def record_messages(record) -> list[chat.Message]:
    """The conversation in one JSONL record; BadRecord says why a record is not one."""
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"a JSON {type(record).__name__}, not an object")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise BadRecord("bad messages", "'messages' is not a non-empty list")
        messages = []
        for i, message in enumerate(raw):
            if not isinstance(message, dict):
                raise BadRecord("bad messages", f"messages[{i}] is not an object")
            role = message.get("role")
            if role not in chat.ROLES:
                raise BadRecord(
                    "unknown role", f"messages[{i}].role={role!r} is not one of {chat.ROLES}"
                )
            content = _text(message, "content")
            messages.append({"role": role, "content": content})
    elif "prompt" in record or "response" in record:
        # An optional system prompt; empty or null means none.
        system = record.get("system") or None
        messages = [{"role": "system", "content": _text(record, "system")}] if system else []
        messages.append({"role": "user", "content": _text(record, "prompt")})
        messages.append({"role": "assistant", "content": _text(record, "response")})
    else:
        raise BadRecord("missing field", "neither 'messages' nor 'prompt' and 'response'")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn", "no assistant message to learn from")
    return messages


@dataclasses.dataclass
class _Report:
    """Skipped records by kind (with a few quoted), truncated and dropped examples."""

    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    quoted: list[str] = dataclasses.field(default_factory=list)
    examples: int = 0
    truncated: int = 0
    dropped: int = 0

    def skip(self, where: str, kind: str, detail: str) -> None:
        self.skipped[kind] += 1
        if len(self.quoted) < _QUOTED:
            self.quoted.append(f"{where}: {detail}")

    def warn(self, name: str, seq_len: int) -> None:
        if self.skipped:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped.items()))
            _log.warning(
                "data.source %s: skipped %d bad records (%s), e.g. %s",
                name,
                sum(self.skipped.values()),
                kinds,
                "; ".join(self.quoted),
            )
        if self.truncated:
            _log.warning(
                "data.source %s: %d of %d examples are longer than train.seq_len + 1 = %d "
                "tokens and were cut to their first %d; %d of those kept no response token and "
                "were dropped. Raise train.seq_len to keep more.",
                name,
                self.truncated,
                self.examples,
                seq_len + 1,
                seq_len + 1,
                self.dropped,
            )


def split_key(record) -> str:
    """The hash that assigns a chat record to its split; BadRecord if it is no conversation."""
    key = json.dumps(record_messages(record), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def conversations(item: sources.SourceSpec, split: str) -> list[Example]:
    """(where, messages) of every good record of one split of one source."""
    records = sources.load_records(item, split, split_key)
    return [(records.where(i), record_messages(record)) for i, record in enumerate(records)]


def _encode_split(
    examples: list[Example], template: chat.Template, tokenizer, seq_len: int, report: _Report
) -> WeightedDocuments:
    ids, weights = [], []
    for lo in range(0, len(examples), _ENCODE_CHUNK):
        pieces_list = []
        for where, messages in examples[lo : lo + _ENCODE_CHUNK]:
            try:
                pieces_list.append(template.pieces(messages))
            except chat.RenderError as err:
                report.skip(where, "template error", str(err))
        for example_ids, example_weights in chat.encode(pieces_list, tokenizer):
            report.examples += 1
            if example_ids.size > seq_len + 1:  # never split across rows: keep the start
                report.truncated += 1
                example_ids = example_ids[: seq_len + 1]
                example_weights = example_weights[: seq_len + 1]
                if not example_weights.any():
                    report.dropped += 1
                    continue
            ids.append(example_ids)
            weights.append(example_weights)
    return WeightedDocuments(ids, weights)


@functools.cache
def _encoded(
    kind: str, target: str, tokenizer: str, template: str, seq_len: int
) -> dict[str, WeightedDocuments]:
    item = sources.SourceSpec(kind, target)
    report = _Report()
    chat_template = chat.load(template, tokenizer)
    tok = tokenizers.get_tokenizer(tokenizer)
    docs = {
        split: _encode_split(conversations(item, split), chat_template, tok, seq_len, report)
        for split in sources.SPLITS
    }
    report.warn(str(item), seq_len)
    return docs


def load_examples(
    item: sources.SourceSpec, split: str, tokenizer: str, template: str, seq_len: int
) -> WeightedDocuments:
    """One split of one SFT source: token ids with loss weights (cached per process)."""
    return _encoded(item.kind, item.target, tokenizer, template, seq_len)[split]
