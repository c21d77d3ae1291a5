"""GRPO's prompts: records with a `prompt` (text or chat messages) and any extra fields.

With `task="grpo"`, `data.source` names records (`files:GLOB`, `python:module:function`, a
registered set such as `arithmetic`, or a mixture) of the form `{"prompt": ..., **fields}`.
A text prompt is tokenized as TRL does (with BOS, no EOS); a conversation is rendered with
`data.chat_template` followed by the assistant header. Every other field of the record (an
`answer`, say) reaches the reward functions as a keyword argument. Without named splits each
record goes to the split of a hash of its prompt.

A prompt longer than `train.seq_len + 1 - grpo.max_completion_length` tokens leaves no room
for its completion in a training row: it is skipped and counted, with `file:line` examples.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging

import numpy as np

from jtrain.data import sources, tokenizers
from jtrain.data.records import BadRecord
from jtrain.tasks import chat, preference_examples

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: its token ids, the record's prompt as given, and the other fields."""

    ids: np.ndarray  # int32
    prompt: str | list
    fields: dict
    where: str


def source_names() -> tuple[str, ...]:
    """Registered record sets with prompts: prompt sets, and chat sets (prompt/response)."""
    return tuple(sorted({*sources.source_names("prompts"), *sources.source_names("chat")}))


def parse_spec(spec) -> tuple[sources.SourceSpec, ...]:
    """Parses `data.source` for task=grpo; a ValueError says what it may be."""
    return sources.parse_record_spec(spec, source_names(), 'prompts (records with a "prompt")')


def _record_prompt(record) -> str | list:
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"a JSON {type(record).__name__}, not an object")
    return preference_examples.record_part(record, "prompt")


def split_key(record) -> str:
    """The hash that assigns a prompt record to its split; BadRecord if it has no prompt."""
    key = json.dumps(_record_prompt(record), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def encode(prompt: str | list, tokenizer, template_spec: tuple[str, str]) -> np.ndarray:
    """The ids the sampler continues: text with BOS, or messages with the assistant header."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_bos=True, add_eos=False).astype(np.int32)
    template = chat.load(*template_spec)
    return chat.encode([template.prompt_pieces(prompt)], tokenizer)[0][0]


@functools.cache
def _loaded(kind: str, target: str, split: str, tokenizer: str, template: str, longest: int):
    item = sources.SourceSpec(kind, target)
    records = sources.load_records(item, split, split_key)
    tok = tokenizers.get_tokenizer(tokenizer)
    prompts, too_long, refused = [], [], []
    for i, record in enumerate(records):
        prompt = _record_prompt(record)
        try:
            ids = encode(prompt, tok, (template, tokenizer))
        except chat.RenderError as err:
            refused.append(f"{records.where(i)}: {err}")
            continue
        if ids.size > longest:
            too_long.append(records.where(i))
            continue
        fields = {k: v for k, v in record.items() if k != "prompt"}
        prompts.append(Prompt(ids, prompt, fields, records.where(i)))
    if refused:
        _log.warning(
            "data.source %s (%s): skipped %d prompts the chat template refused, e.g. %s",
            item, split, len(refused), "; ".join(refused[:3]),
        )  # fmt: skip
    if too_long:
        _log.warning(
            "data.source %s (%s): skipped %d prompts longer than %d tokens, which leave no room "
            "for grpo.max_completion_length new tokens in train.seq_len + 1, e.g. %s; raise "
            "train.seq_len.",
            item, split, len(too_long), longest, "; ".join(too_long[:3]),
        )  # fmt: skip
    return tuple(prompts)


def load_prompts(
    specs, split: str, tokenizer: str, template: str, longest: int
) -> tuple[Prompt, ...]:
    """Every usable prompt of a split of every source, in order."""
    out = []
    for item in specs:
        out += _loaded(item.kind, item.target, split, tokenizer, template, longest)
    return tuple(out)


def stop_ids(tokenizer: str, template: str, prompts) -> tuple[int, ...]:
    """EOS, and the template's end-of-turn when any prompt is a conversation."""
    tok = tokenizers.get_tokenizer(tokenizer)
    stops = {int(tok.eos_id)}
    if any(isinstance(p.prompt, list) for p in prompts):
        stops.add(int(chat.load(template, tokenizer).stop_id))
    return tuple(sorted(stops))
