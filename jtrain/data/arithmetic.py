"""The embedded arithmetic task: "What is 17 + 28?" answered "45", for SFT, DPO and GRPO.

Every question `a + b` and `a - b` with a, b in 0..49 exists once (5,000 in all; differences
may be negative). The set registers as `arithmetic`, chat records `{"prompt": "What is 17 +
28?", "response": "45", "answer": "45"}`: SFT reads prompt/response, and an evaluation
compares completions with "answer". `arithmetic_prompts` holds the same questions for RL,
`{"prompt": [the user's message], "answer": "45"}`: GRPO renders the prompt with the chat
template the SFT model learned and hands "answer" to its reward functions.

The splits are fixed, disjoint by question and sized exactly: test 500, val 500, train the
rest (4,000). Questions are grouped with their mirror (`a + b` with `b + a`, `a - b` with
`b - a`), and a group goes to one split, so no test answer can be recalled from its mirror in
train. Groups are ranked by a salted sha256 (never Python's hash, never input order) and dealt
in rank order to test, then val, then train; within a split, records keep that rank order, so
any prefix of a split is a uniform sample of it.
"""

from __future__ import annotations

import functools
import hashlib
import operator

from jtrain.data import records

OPERATIONS = {"+": operator.add, "-": operator.sub}
LARGEST = 49  # operands run over 0..LARGEST
SIZES = {"test": 500, "val": 500}  # train holds every other question
_SALT = "jtrain-arithmetic-v1"

Question = tuple[int, str, int]  # (a, op, b)


def prompt(question: Question) -> str:
    """The user's words for `question`: "What is 17 + 28?"."""
    a, op, b = question
    return f"What is {a} {op} {b}?"


def answer(question: Question) -> str:
    """The exact answer of `question` as text: "45", "-21"."""
    a, op, b = question
    return str(OPERATIONS[op](a, b))


def _rank(group: str) -> bytes:
    return hashlib.sha256(f"{_SALT}:{group}".encode()).digest()


@functools.cache
def _questions() -> dict[str, tuple[Question, ...]]:
    """{split: questions}, each split in the rank order of its groups."""
    groups: dict[str, list[Question]] = {}
    for op in OPERATIONS:
        for a in range(LARGEST + 1):
            for b in range(LARGEST + 1):
                groups.setdefault(f"{min(a, b)}{op}{max(a, b)}", []).append((a, op, b))
    out: dict[str, list[Question]] = {split: [] for split in records.SPLITS}
    for group in sorted(groups, key=_rank):
        members = groups[group]
        # A pair that would overshoot a split's size falls through to the next split; the
        # groups of one question (a + a, a - a) then fill the last places exactly.
        split = next(
            (s for s, size in SIZES.items() if len(out[s]) + len(members) <= size), "train"
        )
        out[split].extend(members)
    return {split: tuple(questions) for split, questions in out.items()}


def questions(split: str) -> tuple[Question, ...]:
    """The (a, op, b) questions of `split`, in the set's fixed order."""
    if split not in records.SPLITS:
        raise ValueError(f"Unknown split {split!r}; allowed: {', '.join(records.SPLITS)}.")
    return _questions()[split]


@records.register("arithmetic", holds="chat")
def arithmetic_records(split: str) -> list[dict]:
    """The `arithmetic` record set: `{"prompt", "response", "answer"}` records of `split`."""
    out = []
    for question in questions(split):
        text = answer(question)
        out.append({"prompt": prompt(question), "response": text, "answer": text})
    return out


@records.register("arithmetic_prompts", holds="prompts")
def arithmetic_prompts(split: str) -> list[dict]:
    """The same questions as RL prompts: `{"prompt": [the user's message], "answer"}`, so the
    prompt is rendered with the chat template the SFT model was trained with."""
    return [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
        for r in arithmetic_records(split)
    ]
