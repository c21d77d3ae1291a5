"""Embedded text record sets, in every install: CPython's help topics and stdlib source.

`pydoc_topics` (the `pydoc_data.topics` help texts) and `python_stdlib` (the source code of
the standard library's top-level modules) register as record sets of `{"text": ...}` records;
`pydoc_topics()` and `python_stdlib()` give the same texts as `{split: [text, ...]}`.
"""

from __future__ import annotations

import functools
import glob
import os

from jtrain.data import records

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
    docs: dict[str, list[str]] = {split: [] for split in records.SPLITS}
    for name in sorted(topics):
        docs[records.split_of(f"{_PYDOC_SALT}:{groups[name]}")].append(topics[name])
    return {split: tuple(texts) for split, texts in docs.items()}


def pydoc_topics() -> dict[str, list[str]]:
    """Returns CPython's `pydoc_data.topics` help texts per split, ordered by topic name."""
    return {split: list(texts) for split, texts in _pydoc_topics().items()}


@functools.cache
def _python_stdlib() -> dict[str, tuple[str, ...]]:
    import sysconfig

    # Top-level modules only (168 files, 4.7 MB on CPython 3.11): packages add tests and
    # generated tables, and the top level is already a different domain from the docs.
    directory = sysconfig.get_paths()["stdlib"]
    docs: dict[str, list[str]] = {split: [] for split in records.SPLITS}
    for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        docs[records.split_of(f"jtrain-stdlib-v1:{os.path.basename(path)}")].append(text)
    return {split: tuple(texts) for split, texts in docs.items()}


def python_stdlib() -> dict[str, list[str]]:
    """Returns the source code of the standard library's top-level modules per split."""
    return {split: list(texts) for split, texts in _python_stdlib().items()}


@records.register("pydoc_topics")
def pydoc_topic_records(split: str) -> list[dict]:
    """The `pydoc_topics` record set: one `{"text": ...}` per help topic of `split`."""
    return [{"text": text} for text in _pydoc_topics()[split]]


@records.register("python_stdlib")
def python_stdlib_records(split: str) -> list[dict]:
    """The `python_stdlib` record set: one `{"text": ...}` per top-level module of `split`."""
    return [{"text": text} for text in _python_stdlib()[split]]
