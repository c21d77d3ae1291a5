"""Tests for supervised fine-tuning data: records, chat templates, loss masks, packing, eval."""

import gzip
import itertools
import json
import logging
import math
from pydoc_data.topics import topics

import numpy as np
import pytest
import tokenizers as hf

from configs import tiny
from jtrain.data import docstrings, packing, pipeline, sources, tokenizers
from jtrain.data.documents import WeightedDocuments
from jtrain.tasks import chat
from jtrain.tasks import sft_examples as sft
from jtrain.tasks.sft import SFTTask

BYTE = tokenizers.ByteTokenizer()
CHATML = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('Conversations start with a user or system turn.') }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (  # Meta-Llama-3-8B-Instruct's template
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
SPECIALS = [
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "  6, of course.  "},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json with chat specials and a ChatML chat_template."""
    directory = tmp_path_factory.mktemp("chat_tok")
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["".join(topics[k] for k in sorted(topics))[:20_000]], trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": "<pad>",
        "chat_template": CHATML,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def sft_config(source, seq_len=24, batch_size=4, packing_=True, template="builtin", tok="byte"):
    config = tiny.get_config()
    config.task = "sft"
    config.data.source = source
    config.data.tokenizer = str(tok)
    config.data.chat_template = template
    config.data.packing = packing_
    config.data.prefetch = 0
    config.train.seq_len = seq_len
    config.train.batch_size = batch_size
    config.eval.steps = -1
    return config


def write_jsonl(path, records):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(record if isinstance(record, str) else json.dumps(record))
            f.write("\n")
    return path


def qa_records(n, long_every=0):
    out = []
    for i in range(n):
        answer = f"{i} plus {i % 7} is {i + i % 7}."
        if long_every and i % long_every == 0:
            answer += " Explained at length." * 4
        if i % 3:
            out.append({"prompt": f"Add {i} and {i % 7}.", "response": answer})
        else:
            turns = [{"role": "user", "content": f"Sum {i}, {i % 7}?"}]
            out.append({"messages": turns + [{"role": "assistant", "content": answer}]})
    return out


def masked_targets(ids, weights):
    """The ids that are loss targets: token t + 1 where its weight is 1."""
    return ids[1:][weights[1:] > 0]


def test_builtin_renders_prompt_response_with_mask_on_response_and_eos():
    messages = sft.record_messages({"system": "Be terse.", "prompt": "Hi?", "response": "Hello."})
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    template = chat.load("builtin", "byte")
    [(ids, weights)] = chat.encode([template.pieces(messages)], BYTE)
    assert ids[0] == BYTE.bos_id and ids[-1] == BYTE.eos_id
    assert BYTE.decode(ids) == "System: Be terse.\n\nUser: Hi?\n\nAssistant: Hello."
    targets = masked_targets(ids, weights)
    assert BYTE.decode(targets) == "Hello." and targets[-1] == BYTE.eos_id
    prompt = chat.prompt_ids(template, BYTE, "Hi?")
    assert BYTE.decode(prompt) == "User: Hi?\n\nAssistant: " and prompt[0] == BYTE.bos_id
    # The prompt the sampler sees is exactly the start of a training example.
    [(one, _)] = chat.encode(
        [template.pieces(sft.record_messages({"prompt": "Hi?", "response": "Yo"}))], BYTE
    )
    np.testing.assert_array_equal(one[: prompt.size], prompt)


def test_builtin_masks_every_assistant_turn_only():
    template = chat.load("builtin", "byte")
    [(ids, weights)] = chat.encode(
        [template.pieces(sft.record_messages({"messages": CONVERSATION}))], BYTE
    )
    targets = masked_targets(ids, weights)
    assert (targets == BYTE.eos_id).sum() == 2  # each assistant turn learns to stop
    assert BYTE.decode(targets) == "It is 4." + "  6, of course.  "
    assert "User" not in BYTE.decode(targets) and weights[0] == 0


def test_hf_template_from_tokenizer_config_matches_transformers(hf_dir):
    tok = tokenizers.get_tokenizer(str(hf_dir))
    template = chat.load("tokenizer", str(hf_dir))
    im_end = tok._tok.token_to_id("<|im_end|>")
    assert template.stop_id == im_end
    text = template.render(CONVERSATION)
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(hf_dir / "tokenizer.json"), chat_template=CHATML
    )
    assert text == reference.apply_chat_template(CONVERSATION, tokenize=False)
    prompt = template.render(CONVERSATION[:2], add_generation_prompt=True)
    assert prompt == reference.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True
    )
    [(ids, weights)] = chat.encode([template.pieces(CONVERSATION)], tok)
    # Exactly each assistant turn's content and its <|im_end|>; the "\n" after it is template.
    expected = np.concatenate(
        [
            np.append(tok.encode(m["content"], add_bos=False, add_eos=False), im_end)
            for m in CONVERSATION
            if m["role"] == "assistant"
        ]
    )
    np.testing.assert_array_equal(masked_targets(ids, weights), expected)
    assert tok.decode(ids) == tok.decode(tok.encode(text))  # same text, pieces or whole


def test_jinja_file_template_llama3(hf_dir, tmp_path):
    path = tmp_path / "llama3.jinja"
    path.write_text(LLAMA3)
    tok = tokenizers.get_tokenizer(str(hf_dir))
    template = chat.load(str(path), str(hf_dir))
    eot = tok._tok.token_to_id("<|eot_id|>")
    assert template.stop_id == eot
    [(ids, weights)] = chat.encode([template.pieces(CONVERSATION)], tok)
    assert ids[0] == tok.bos_id  # the template's {{ bos_token }}
    expected = np.concatenate(
        [
            np.append(tok.encode(m["content"].strip(), add_bos=False, add_eos=False), eot)
            for m in CONVERSATION
            if m["role"] == "assistant"
        ]
    )
    np.testing.assert_array_equal(masked_targets(ids, weights), expected)
    prompt = chat.prompt_ids(template, tok, "Hi")
    assert tok._tok.decode(prompt.tolist(), skip_special_tokens=False).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_template_that_rewrites_earlier_turns_is_a_bad_record(hf_dir, tmp_path, caplog):
    # Earlier assistant turns rendered without content once a later turn follows (as
    # templates that drop old reasoning do): the assistant tokens cannot be found.
    path = tmp_path / "rewrites.jinja"
    path.write_text(
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "<|im_start|>assistant\n<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    template = chat.load(str(path), str(hf_dir))
    with pytest.raises(chat.RenderError, match="differently once later turns follow"):
        template.pieces(CONVERSATION)
    # In a source, such conversations (and any the template refuses) are counted and skipped.
    starts_with_answer = [{"role": "assistant", "content": "Hi."}, *CONVERSATION[1:]]
    data = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"messages": starts_with_answer}]
    )
    item = sources.SourceSpec("files", str(data))
    with caplog.at_level(logging.WARNING, logger="jtrain"):
        for template_spec in (str(path), "tokenizer"):
            docs = [
                sft.load_examples(item, s, str(hf_dir), template_spec, 64)
                for s in "val test train".split()
            ]
            assert sum(len(d) for d in docs) == (0 if template_spec == str(path) else 1)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "template error: 2" in messages and "start with a user or system turn" in messages


def test_packed_rows_keep_each_examples_mask_and_segments():
    template = chat.load("builtin", "byte")
    records = [{"prompt": f"Q{i}", "response": "A" * (i + 1)} for i in range(6)]
    encoded = chat.encode([template.pieces(sft.record_messages(r)) for r in records], BYTE)
    docs = WeightedDocuments([e[0] for e in encoded], [e[1] for e in encoded])
    seq_len = 63  # about two examples a row
    plan = packing.eval_plan(docs.lengths, seq_len)
    assert plan.num_rows < len(records)  # examples do share rows
    rows = packing.eval_rows(
        plan, range(plan.num_rows), docs.doc, seq_len, BYTE.pad_id, docs.doc_weights
    )
    batch = packing.to_batch(rows)
    assert "weights" not in batch  # folded into mask; the step sees the usual keys
    for r in range(plan.num_rows):
        for segment, j in enumerate(range(plan.row_starts[r], plan.row_starts[r + 1]), start=1):
            d = int(plan.doc[j])
            at = batch["segment_ids"][r] == segment
            np.testing.assert_array_equal(batch["positions"][r][at], np.arange(at.sum()))
            # Its own response and EOS, nothing of its neighbours (such as their BOS).
            targets = batch["targets"][r][at][batch["loss_weight"][r][at] > 0]
            assert BYTE.decode(targets) == records[d]["response"]
            np.testing.assert_array_equal(targets, masked_targets(docs.doc(d), docs.doc_weights(d)))
    assert batch["loss_weight"].sum() == sum(
        docs.doc_weights(i)[1:].sum() for i in range(len(docs))
    )


def test_bad_records_are_skipped_and_counted_with_file_line(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "chats.jsonl",
        [
            {"prompt": "Good?", "response": "Yes."},
            "{not json",
            {"prompt": "No answer"},
            {"prompt": 3, "response": "x"},
            {"messages": [{"role": "wizard", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            [1, 2],
            {"text": "plain text"},
            {"messages": CONVERSATION},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="jtrain"):
        docs = [
            sft.load_examples(sources.SourceSpec("files", str(path)), s, "byte", "builtin", 64)
            for s in sources.SPLITS
        ]
    assert sum(len(d) for d in docs) == 2
    [message] = [r.getMessage() for r in caplog.records if "skipped 8" in r.getMessage()]
    assert "skipped 8 records" in message  # "{not json" and [1, 2] are both malformed
    for kind in ("malformed: 2", "missing field: 2", "non-string field: 1", "unknown role: 1"):
        assert kind in message
    assert "no assistant turn: 1" in message and "empty content: 1" in message
    assert f"{path}:2: " in message and f"{path}:3: " in message


def test_long_examples_truncated_and_empty_ones_dropped(tmp_path, caplog):
    records = [
        {"prompt": "short", "response": "fits"},
        {"prompt": "p", "response": "a long answer " * 10},  # truncated, keeps a response
        {"prompt": "a very long question " * 10, "response": "lost"},  # no response left
    ]
    path = write_jsonl(tmp_path / "long.jsonl.gz", records)
    item = sources.SourceSpec("files", str(path))
    with caplog.at_level(logging.WARNING, logger="jtrain"):
        docs = [sft.load_examples(item, s, "byte", "builtin", 40) for s in sources.SPLITS]
    assert sum(len(d) for d in docs) == 2
    assert max(int(d.lengths.max(initial=0)) for d in docs) == 41
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "2 of 3 examples are longer than train.seq_len + 1 = 41" in message
    assert "1 of those kept no response token and were dropped" in message


@pytest.mark.parametrize("packed", [True, False])
def test_eval_counts_every_response_token_once(tmp_path, packed):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(120, long_every=9))
    config = sft_config(f"files:{path}", seq_len=48, batch_size=8, packing_=packed)
    for split in ("val", "test"):
        docs = pipeline._split_examples(pipeline._settings(config, 0, 1), split)
        expected = sum(int(docs.doc_weights(i)[1:].sum()) for i in range(len(docs)))
        batches = list(pipeline.eval_batches(config, split))
        assert expected > 0 and {b["inputs"].shape for b in batches} == {(8, 48)}
        assert sum(b["loss_weight"].sum() for b in batches) == expected
        if not packed:  # one example per row
            assert len(batches) == math.ceil(len(docs) / 8)
            assert all((b["segment_ids"] <= 1).all() for b in batches)


@pytest.mark.parametrize("packed", [True, False])
def test_train_iterator_state_round_trip(tmp_path, packed):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(80))
    config = sft_config(f"files:{path}", seq_len=40, batch_size=4, packing_=packed)
    iterator = pipeline.make_train_iterator(config)
    first = list(itertools.islice(iterator, 3))
    state = iterator.get_state()
    expected = list(itertools.islice(iterator, 30))  # crosses an epoch boundary
    restored = pipeline.make_train_iterator(config)
    restored.set_state(state)
    for a, b in zip(expected, itertools.islice(restored, 30), strict=True):
        assert a.keys() == b.keys() == first[0].keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert all(b["loss_weight"].sum() > 0 for b in first)
    # Training masks only response tokens: no masked target is a prompt's byte.
    for batch in expected:
        text = BYTE.decode(batch["targets"][batch["loss_weight"] > 0])
        assert "Add " not in text and "Sum " not in text and "User" not in text


def test_python_docstrings_source():
    examples = docstrings.python_docstrings()
    assert len(examples["train"]) > 1000 and len(examples["val"]) > 100
    where, messages = examples["val"][0]
    assert where.startswith("python_docstrings:")
    assert messages[0]["content"].startswith("Write the docstring for ")
    seen = {split: {m[1]["content"] for _, m in examples[split]} for split in sources.SPLITS}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"]
    assert docstrings.python_docstrings() == examples  # deterministic, cached


@pytest.mark.parametrize(
    "change, match",
    [
        ({"chat_template": "chatml"}, "data.chat_template='chatml'"),
        ({"chat_template": ""}, "data.chat_template=''"),
        ({"chat_template": "tokenizer"}, "data.chat_template='tokenizer'"),
        ({"source": "pydoc_topics"}, "with task='sft' it names chat examples"),
    ],
)
def test_config_validation_names_the_key(change, match):
    config = sft_config("python_docstrings")
    for key, value in change.items():
        config.data[key] = value
    with pytest.raises(ValueError, match=match):
        SFTTask.validate(config)


def test_config_validation_of_template_files(hf_dir, tmp_path):
    from jtrain import config as config_lib

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    cases = [
        (str(bare), "tokenizer", "has no chat_template"),
        ("byte", str(hf_dir / "tokenizer_config.json"), "only a Hugging Face tokenizer"),
        (str(hf_dir), str(broken), f"{broken}:1"),
        (str(hf_dir), str(tmp_path / "missing.jinja"), "neither a template name nor"),
    ]
    for tok, template, match in cases:
        config = sft_config("python_docstrings", tok=tok, template=template)
        with pytest.raises(ValueError, match=match) as err:
            SFTTask.validate(config)
        assert "data.chat_template=" in str(err.value)
    config = sft_config("python_docstrings", template="nope")
    with pytest.raises(config_lib.ConfigError, match="config.data.chat_template='nope'"):
        config_lib.validate(config)
    config = sft_config("python_docstrings", tok=hf_dir, template="tokenizer")
    config.model.vocab_size = 512  # the tokenizer's 400 ids fit
    SFTTask.validate(config)


def test_train_and_evaluate_sft_end_to_end(tmp_path, capsys):
    from jtrain import run

    path = write_jsonl(tmp_path / "qa.jsonl", qa_records(200))
    config = sft_config(f"files:{path}", seq_len=32, batch_size=16)
    config.train.steps = 4
    config.schedule.warmup_steps = 2
    config.train.log_every = 2
    config.eval.every_steps = 0
    config.eval.sample_tokens = 4
    config.eval.sample_prompt = "Add 2 and 2."
    config.checkpoint.every_steps = 0
    results = run.train_and_evaluate(config, str(tmp_path / "run"))
    docs = pipeline._split_examples(pipeline._settings(config, 0, 1), "val")
    response_targets = sum(int(docs.doc_weights(i)[1:].sum()) for i in range(len(docs)))
    assert math.isfinite(results["val"]["loss"]) and 0 <= results["val"]["accuracy"] <= 1
    # The whole split was evaluated, and only its response tokens were counted.
    assert results["val"]["loss_weight"] == response_targets < docs.num_tokens - len(docs)
    assert "Add 2 and 2.\n-> " in capsys.readouterr().out  # the sample went through the template
