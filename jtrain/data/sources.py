"""Text sources: named corpora that hand out documents per split.

A source is a function returning `{split: [document text, ...]}` for every split in `SPLITS`,
registered by name in `_SOURCES`. Splits are assigned with `split_of`, a hash of a document
key alone, so they never depend on Python's hash seed or the input order. This issue ships one
source, the CPython docs embedded in every install; prepared ArrayRecord datasets become
further entries of the registry.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence

SPLITS = ("train", "val", "test")


def split_of(key: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """Returns the split of `key`: sha256(key) as a uniform number in [0, 1), bucketed."""
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or not math.isclose(sum(fractions), 1):
        raise ValueError(
            f"fractions must be {len(SPLITS)} non-negative numbers for {SPLITS} summing to 1, "
            f"got {tuple(fractions)}."
        )
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for split, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if u < cumulative:
            return split
    # Rounding can leave the sum a hair under 1: fall back to the last non-empty split.
    return next(s for s, f in zip(reversed(SPLITS), reversed(fractions), strict=True) if f > 0)


# Several pydoc topics repeat long passages of others ("compound" holds the text of "if",
# "while", "try", "with", ...; "specialnames" that of "customization", ...). Split by topic
# alone, 36% of the test split's text was verbatim in train. So topics that share a paragraph
# of at least _SHARED_PARAGRAPH_CHARS characters form a group, and a group goes to the split of
# its first topic name. The groups are lumpy (the two largest hold 80 KB and 104 KB), and the
# plain hash left test 4% of the bytes; the salt was picked from jtrain-pydoc-v1..v39 as the
# one closest to 80/10/10 bytes: on CPython 3.11 train/val/test get 64/7/8 topics and
# 375,795/52,227/38,095 UTF-8 bytes (80.6%/11.2%/8.2%), and 1 of val's 518 100-character
# chunks (none of test's) occurs in train.
_PYDOC_SALT = "jtrain-pydoc-v9"
_SHARED_PARAGRAPH_CHARS = 200


def _topic_groups(topics: dict[str, str]) -> dict[str, str]:
    """Maps each topic name to the first name of the topics it shares paragraphs with."""
    parent = {name: name for name in topics}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    first_seen: dict[str, str] = {}
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip()
            if len(paragraph) < _SHARED_PARAGRAPH_CHARS:
                continue
            a, b = root(first_seen.setdefault(paragraph, name)), root(name)
            parent[max(a, b)] = min(a, b)
    return {name: root(name) for name in topics}


@functools.cache
def _pydoc_topics() -> dict[str, tuple[str, ...]]:
    from pydoc_data.topics import topics

    groups = _topic_groups(topics)
    docs: dict[str, list[str]] = {split: [] for split in SPLITS}
    for name in sorted(topics):
        docs[split_of(f"{_PYDOC_SALT}:{groups[name]}")].append(topics[name])
    return {split: tuple(texts) for split, texts in docs.items()}


def pydoc_topics() -> dict[str, list[str]]:
    """Returns CPython's `pydoc_data.topics` help texts per split, ordered by topic name."""
    return {split: list(texts) for split, texts in _pydoc_topics().items()}


_SOURCES: dict[str, Callable[[], dict[str, list[str]]]] = {"pydoc_topics": pydoc_topics}


def source_names() -> tuple[str, ...]:
    """Returns the names `load_source` accepts."""
    return tuple(sorted(_SOURCES))


def load_source(name: str) -> dict[str, list[str]]:
    """Returns the documents of source `name` per split."""
    if name not in _SOURCES:
        raise ValueError(f"Unknown data source {name!r}; allowed: {', '.join(source_names())}.")
    return _SOURCES[name]()
