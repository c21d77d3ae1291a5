"""Preference pairs (jtrain.tasks.preference_examples): TRL's three formats, bad records,
truncation, margins, splits, EOS and completion masks; and task="dpo" on them: the same
loss and metrics for any micro-batch or device split, and LoRA's reference (adapters off)."""

import json
import logging
import math
import os

import jax
import ml_collections
import numpy as np
import pytest

from jtrain import config as config_lib
from jtrain import hooks
from jtrain.data import pipeline, sources
from jtrain.data.records import split_of
from jtrain.experiment import Experiment
from jtrain.pretrained import load as load_weights
from jtrain.tasks import preference_examples as pe
from tests.conftest import tiny_config

E2E = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "dpo_e2e")
HF_TOKENIZER = os.path.join(E2E, "tokenizer")
BOS, EOS, PAD = 257, 258, 256  # the byte tokenizer's
BETA = 0.1


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _write(tmp_path, name: str, lines) -> str:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _pairs(path: str, length: int, tokenizer="byte", template="builtin", split="train"):
    (spec,) = pe.parse_spec(f"files:{split}={path}")
    return pe.load_pairs(spec, split, tokenizer, template, length).features


def _ids(pairs, i: int, row: int) -> list[int]:
    return pairs["tokens"][i, row, : pairs["lengths"][i, row]].tolist()


def _bytes(text: str) -> list[int]:
    return list(text.encode())


# Formats.


def test_the_three_formats_parse():
    text = pe.record_pair({"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green."})
    assert (text.prompt, text.chosen, text.rejected, text.margin) == (
        "Sky?",
        " Blue.",
        " Green.",
        0,
    )
    assert not text.conversational
    messages = pe.record_pair(
        {"prompt": [_user("Hi")], "chosen": [_assistant("Hello")], "rejected": [_assistant("No")]}
    )
    assert messages.conversational and messages.prompt == [_user("Hi")]
    assert messages.chosen == [_assistant("Hello")]
    implicit = pe.record_pair({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    assert (implicit.prompt, implicit.chosen, implicit.rejected) == (
        "The sky is",
        " blue.",
        " green.",
    )
    implicit_chat = pe.record_pair(
        {
            "chosen": [_user("Hi"), _assistant("Hello")],
            "rejected": [_user("Hi"), _assistant("Go away")],
        }
    )
    assert implicit_chat.prompt == [_user("Hi")]
    assert implicit_chat.rejected == [_assistant("Go away")]


# What is wrong with a record -> (the line, the kind it is counted as, the reason given).
BAD_RECORDS = {
    "not JSON": ('{"prompt": "a", "chosen": ', "malformed", "bad JSON"),
    "not an object": ([1, 2], "malformed", "a JSON list, not an object"),
    "missing chosen": ({"prompt": "p", "rejected": " r"}, "missing field", "no 'chosen'"),
    "non-string": (
        {"prompt": "p", "chosen": 5, "rejected": " r"},
        "non-string field",
        "'chosen' is int",
    ),
    "mixed text and messages": (
        {"prompt": "p", "chosen": " c", "rejected": [_assistant("r")]},
        "mixed formats",
        "both be text or messages",
    ),
    "text prompt, message completions": (
        {"prompt": "p", "chosen": [_assistant("c")], "rejected": [_assistant("r")]},
        "mixed formats",
        "'prompt' must be messages",
    ),
    "empty completion": (
        {"prompt": "p", "chosen": "  ", "rejected": " r"},
        "empty content",
        "'chosen' is empty",
    ),
    "bad margin": (
        {"prompt": "p", "chosen": " c", "rejected": " r", "margin": "high"},
        "bad margin",
        "'margin' is str",
    ),
    "no shared start": ({"chosen": "abc", "rejected": "xyz"}, "no prompt", "share no start"),
    "no prompt messages": (
        {"prompt": [], "chosen": [_assistant("c")], "rejected": [_assistant("r")]},
        "bad messages",
        "'prompt' is not a non-empty list",
    ),
    "non-string message": (
        {"prompt": [_user(3)], "chosen": [_assistant("c")], "rejected": [_assistant("r")]},
        "non-string field",
        "'content' is int",
    ),
}


@pytest.mark.parametrize("what", sorted(BAD_RECORDS))
def test_bad_record_is_skipped_and_counted_with_file_and_line(what, tmp_path, caplog):
    line, kind, reason = BAD_RECORDS[what]
    good = {"prompt": "p", "chosen": " c", "rejected": " r"}
    path = _write(tmp_path, "pairs.jsonl", [good, line, good])
    with caplog.at_level(logging.WARNING):
        records = sources.load_records(
            sources.SourceSpec("files", f"train={path}"), "train", pe.split_key
        )
    assert len(records) == 2 and records.skipped.counts == {kind: 1}
    assert f"skipped 1 records ({kind}: 1), e.g. {path}:2: " in caplog.text
    assert reason in caplog.text


def test_margin_true_is_no_number():
    with pytest.raises(ValueError, match="'margin' is bool"):
        pe.record_pair({"prompt": "p", "chosen": " c", "rejected": " r", "margin": True})


def test_template_error_is_skipped_and_warned(tmp_path, caplog):
    template = tmp_path / "no_system.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system turns') }}{% endif %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    pair = {"prompt": [_user("Hi")], "chosen": [_assistant("Yes")], "rejected": [_assistant("No")]}
    refused = {**pair, "prompt": [{"role": "system", "content": "Be brief."}, _user("Hi")]}
    path = _write(tmp_path, "chats.jsonl", [pair, refused])
    with caplog.at_level(logging.WARNING):
        pairs = _pairs(path, 32, HF_TOKENIZER, str(template))
    assert len(pairs["tokens"]) == 1
    assert f"skipped 1 records (template error: 1), e.g. {path}:2" in caplog.text
    assert "no system turns" in caplog.text


# Tokens, masks, truncation.


def test_text_pair_tokens_and_completion_mask(tmp_path):
    path = _write(tmp_path, "pairs.jsonl", [{"prompt": "ab", "chosen": " cd", "rejected": " e"}])
    pairs = _pairs(path, 10)
    prompt = [BOS, *_bytes("ab")]
    np.testing.assert_array_equal(
        pairs["tokens"][0],
        [prompt + _bytes(" cd") + [EOS] + [PAD] * 3, prompt + _bytes(" e") + [EOS] + [PAD] * 4],
    )
    # Exactly the completion tokens (EOS included): never the prompt, never padding.
    np.testing.assert_array_equal(
        pairs["completion"][0], [[0, 0, 0, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(pairs["lengths"][0], [7, 6])
    assert pairs["margin"][0] == 0.0


def test_eos_ends_text_completions_once(tmp_path):
    """As TRL's add_eos: EOS is added unless the completion's text already ends with it."""
    lines = [
        {"prompt": "What color is the sky?", "chosen": " Blue.", "rejected": " Green."},
        {"prompt": "What color is the sky?", "chosen": " Blue.</s>", "rejected": " Green.</s>"},
    ]
    pairs = _pairs(_write(tmp_path, "pairs.jsonl", lines), 32, HF_TOKENIZER)
    eos = json.load(open(os.path.join(HF_TOKENIZER, "tokenizer.json")))["model"]["vocab"]["</s>"]
    for row in (0, 1):
        first, second = _ids(pairs, 0, row), _ids(pairs, 1, row)
        assert first == second and first[-1] == eos and first[-2] != eos


def test_eos_ends_conversational_completions_through_the_template(tmp_path):
    """The builtin template ends an assistant turn with EOS; none is added on top."""
    pair = {"prompt": [_user("hi")], "chosen": [_assistant("yo")], "rejected": [_assistant("no")]}
    pairs = _pairs(_write(tmp_path, "chats.jsonl", [pair]), 40)
    prompt = [BOS, *_bytes("User: hi\n\nAssistant: ")]
    assert _ids(pairs, 0, 0) == prompt + _bytes("yo") + [EOS]
    assert _ids(pairs, 0, 1) == prompt + _bytes("no") + [EOS]
    mask = pairs["completion"][0, 0]
    assert mask.sum() == 3 and mask[len(prompt) : len(prompt) + 3].all()


def test_truncation_keeps_the_start_and_drops_prompts_that_fill_the_length(tmp_path, caplog):
    lines = [
        {"prompt": "ab", "chosen": " cdefgh", "rejected": " i"},  # 3 + 8 = 11 tokens: fits
        {"prompt": "ab", "chosen": " " + "x" * 20, "rejected": " y"},  # cut to 11
        {"prompt": "p" * 10, "chosen": " c", "rejected": " r"},  # prompt 11 tokens: dropped
    ]
    path = _write(tmp_path, "pairs.jsonl", lines)
    with caplog.at_level(logging.WARNING):
        pairs = _pairs(path, 11)
    assert len(pairs["tokens"]) == 2
    assert _ids(pairs, 0, 0) == [BOS, *_bytes("ab cdefgh"), EOS]  # exactly full: EOS kept
    assert _ids(pairs, 1, 0) == [BOS, *_bytes("ab " + "x" * 7)]  # the start, no EOS
    assert _ids(pairs, 1, 1) == [BOS, *_bytes("ab y"), EOS]
    assert pairs["completion"][1, 0].tolist() == [0] * 3 + [1] * 8
    assert "1 of 3 pairs are longer than 11 tokens" in caplog.text
    assert "1 pairs whose prompt alone fills 11 tokens were dropped" in caplog.text
    assert f"e.g. {path}:2; {path}:3" in caplog.text


def test_margins_are_kept(tmp_path):
    lines = [
        {"prompt": "a", "chosen": " b", "rejected": " c", "margin": 1.5},
        {"prompt": "a", "chosen": " d", "rejected": " e"},
        {"prompt": "a", "chosen": " f", "rejected": " g", "margin": -2},
    ]
    pairs = _pairs(_write(tmp_path, "pairs.jsonl", lines), 8)
    np.testing.assert_array_equal(pairs["margin"], [1.5, 0.0, -2.0])


# Splits.


def test_split_key_is_the_pairs_content():
    explicit = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    same = {"rejected": " green.", "id": 7, "chosen": " blue.", "prompt": "The sky is"}
    implicit = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    assert pe.split_key(explicit) == pe.split_key(same) == pe.split_key(implicit)
    assert pe.split_key(explicit) != pe.split_key({**explicit, "chosen": " red."})


def test_hashed_splits_are_deterministic_and_order_free(tmp_path):
    lines = [{"prompt": f"q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(60)]
    forward = _write(tmp_path, "forward.jsonl", lines)
    backward = _write(tmp_path, "backward.jsonl", lines[::-1])
    for split in sources.SPLITS:
        expected = {json.dumps(x) for x in lines if split_of(pe.split_key(x)) == split}
        for path in (forward, backward):
            records = sources.load_records(sources.SourceSpec("files", path), split, pe.split_key)
            assert {json.dumps(r) for r in records} == expected, (split, path)
        assert expected, f"no pair hashed to {split}"


# A tiny DPO run on the golden pairs: TRL's tiny HF models and tokenizer.


def dpo_config(*, devices=1, microbatches=1, lora_rank=0):
    pairs = os.path.join(E2E, "pairs.jsonl")
    config = tiny_config(
        task="dpo",
        data__source=f"files:train={pairs};val={pairs};test={pairs}",
        data__tokenizer=HF_TOKENIZER,
        data__chat_template="tokenizer",
        model__init_from=f"hf:{os.path.join(E2E, 'policy')}",
        train__seq_len=32,
        train__batch_size=8,
        train__microbatches=microbatches,
        eval__steps=-1,
        optimizer__lr=1e-2,
        schedule__warmup_steps=0,
        mesh__data=devices,
        data__prefetch=0,
    )
    config.model.lora.rank = lora_rank
    reference = "" if lora_rank else f"hf:{os.path.join(E2E, 'reference')}"
    config.dpo = ml_collections.ConfigDict(
        {"loss": "sigmoid", "beta": BETA, "reference": reference}
    )
    config_lib.prepare(config)  # the model's architecture from the HF config.json
    return config


def _experiment(config, devices: int):
    exp = Experiment.from_config(config, jax.devices()[:devices])
    return exp, exp.init_state(base=load_weights(config.model.init_from, exp.abstract_base))


def _one_step(devices: int, microbatches: int, evaluator=None) -> dict[str, dict]:
    """Val metrics at step 0, the train step's own metrics, and val metrics after it.
    `evaluator`: an experiment on the same devices whose compiled evaluation to reuse."""
    config = dpo_config(devices=devices, microbatches=microbatches)
    exp, state = _experiment(config, devices)
    evaluator = evaluator or exp
    before = hooks.evaluate_split(evaluator, state, "val")
    batch = next(iter(pipeline.make_train_iterator(config)))
    state, metrics = exp.train_step(state, exp.global_batch(batch))
    train = exp.task.report(jax.device_get(metrics["totals"]))
    after = hooks.evaluate_split(evaluator, state, "val")
    return {"before": before, "train": train, "after": after, "exp": exp}


@pytest.fixture(scope="module")
def runs():
    one = _one_step(1, 1)
    # The micro-batched run is evaluated by the same compiled eval step as the whole batch.
    return {
        "1 device": one,
        "2 micro-batches": _one_step(1, 2, one["exp"]),
        "4 devices": _one_step(4, 1),
    }


def _assert_same(ours: dict, expected: dict, when: str) -> None:
    """Equal to 1e-6 relative; rewards (beta * a difference of two log-probs) to 1e-6 of the
    log-probs they are made of: float32 sums of ~25 nats carry ~1e-6 of rounding each."""
    assert set(ours) == set(expected)
    logps = max(abs(expected["logps/chosen"]), abs(expected["logps/rejected"]))
    for metric, value in expected.items():
        atol = 1e-6 * BETA * logps if metric.startswith("rewards/") else 0.0
        np.testing.assert_allclose(
            ours[metric], value, rtol=1e-6, atol=atol, err_msg=f"{when} {metric}"
        )


@pytest.mark.parametrize("name", ["2 micro-batches", "4 devices"])
def test_micro_batches_and_devices_do_not_change_dpo_metrics(runs, name):
    reference = runs["1 device"]
    assert reference["before"]["loss_weight"] == 9 and reference["train"]["loss_weight"] == 8
    for when in ("before", "train", "after"):
        _assert_same(runs[name][when], reference[when], when)
    # The step trained: the chosen completions gained on the rejected ones.
    assert reference["after"]["rewards/margins"] > reference["before"]["rewards/margins"]


def test_lora_reference_is_the_base_with_adapters_off():
    config = dpo_config(lora_rank=4)
    exp, state = _experiment(config, 1)
    assert exp.task.frozen_models() == {} and "reference" not in state.frozen
    assert exp.has_frozen_base()  # the one copy of the weights, shared by policy and reference
    start = hooks.evaluate_split(exp, state, "val")
    assert start["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert start["rewards/accuracies"] == 0 and start["rewards/margins"] == 0
    # Adapters moved (as training would): the policy changes, the reference stays the base,
    # whose log-probs are the policy's at the start, when the adapters were zero.
    rng = np.random.default_rng(0)

    def move(x):  # on the host: eager device ops would each compile
        moved = np.asarray(x) + 0.2 * rng.standard_normal(x.shape, dtype=np.float32)
        return jax.device_put(moved, x.sharding)

    params = jax.tree.map(move, state.params)
    moved = hooks.evaluate_split(exp, state.replace(params=params), "val")
    assert moved["loss"] != pytest.approx(math.log(2), rel=1e-3)
    for part in ("chosen", "rejected"):
        expected = BETA * (moved[f"logps/{part}"] - start[f"logps/{part}"])
        assert moved[f"rewards/{part}"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
