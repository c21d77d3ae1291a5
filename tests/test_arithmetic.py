"""The embedded arithmetic task: questions, answers, fixed disjoint splits, loading by name."""

import re

import pytest

from jtrain.data import arithmetic, sources
from jtrain.tasks import sft_examples

QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def test_every_question_once_in_exactly_sized_splits():
    splits = {split: arithmetic.questions(split) for split in sources.SPLITS}
    assert {split: len(q) for split, q in splits.items()} == {
        "train": 4_000,
        "val": 500,
        "test": 500,
    }
    every = [q for questions in splits.values() for q in questions]
    expected = {(a, op, b) for op in "+-" for a in range(50) for b in range(50)}
    assert len(every) == len(set(every)) == 5_000 and set(every) == expected


def test_splits_are_disjoint_by_question_and_by_its_mirror():
    def groups(split):
        return {(op, min(a, b), max(a, b)) for a, op, b in arithmetic.questions(split)}

    train, val, test = groups("train"), groups("val"), groups("test")
    assert not (train & test) and not (train & val) and not (val & test)
    train_prompts = {r["prompt"] for r in arithmetic.arithmetic_records("train")}
    assert not train_prompts & {r["prompt"] for r in arithmetic.arithmetic_records("test")}


def test_splits_are_fixed():
    # Recomputed from scratch, and pinned: a change of salt or order would move test questions
    # into train for runs that compare with older ones.
    assert arithmetic._questions.__wrapped__() == arithmetic._questions()
    assert arithmetic.questions("test")[:2] == ((1, "+", 8), (8, "+", 1))
    assert arithmetic.questions("val")[0] == (11, "+", 12)


def test_records_hold_prompt_response_and_the_correct_answer():
    for split in sources.SPLITS:
        records = arithmetic.arithmetic_records(split)
        ops = set()
        for record in records:
            assert set(record) == {"prompt", "response", "answer"}
            a, op, b = QUESTION.fullmatch(record["prompt"]).groups()
            expected = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert record["response"] == record["answer"] == str(expected)
            ops.add(op)
        assert ops == {"+", "-"}
        assert any(r["answer"].startswith("-") for r in records)  # negative differences too
    assert arithmetic.prompt((7, "-", 30)) == "What is 7 - 30?"
    assert arithmetic.answer((7, "-", 30)) == "-23"


def test_loads_by_name_through_the_sources_path():
    assert "arithmetic" in sft_examples.source_names()
    (spec,) = sft_examples.parse_spec("arithmetic")
    assert spec == sources.SourceSpec("named", "arithmetic")
    for split, size in (("train", 4_000), ("val", 500), ("test", 500)):
        records = sources.load_records(spec, split, sft_examples.split_key)
        assert len(records) == size and records.skipped.total == 0  # every record is a chat
        assert records[0] == arithmetic.arithmetic_records(split)[0]
        assert records.where(3) == f"arithmetic:{split}[3]"
    messages = sft_examples.record_messages(records[0])
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="Unknown split 'dev'"):
        arithmetic.questions("dev")


def test_prompt_records_hold_the_same_questions_as_messages():
    assert "arithmetic_prompts" in sources.source_names("prompts")
    chats, prompts = arithmetic.arithmetic_records("val"), arithmetic.arithmetic_prompts("val")
    assert prompts == [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in chats
    ]
