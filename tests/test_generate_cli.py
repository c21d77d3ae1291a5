"""python -m jtrain.generate: every kind of input line completes, greedy output is the
Sampler's, bad lines are reported by line and skipped, outputs are never overwritten."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jtrain import checkpoint, export, generate, runs
from jtrain.data import tokenizers
from jtrain.sampler import Completion, Sampler
from tests.conftest import REPO, main_env, tiny_trained_run

NEW = 8
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def generator(run):
    return generate.load(run)


def _write_lines(path, lines) -> str:
    with open(path, "w") as f:
        f.writelines((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return str(path)


def _read_lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _generate(generator, tmp_path, lines, **settings):
    tmp_path.mkdir(exist_ok=True)
    prompts = _write_lines(tmp_path / "prompts.jsonl", lines)
    reports = []
    summary = generate.generate_file(
        generator,
        prompts,
        str(tmp_path / "out.jsonl"),
        generate.Settings(**{"max_new_tokens": NEW, **settings}),
        report=reports.append,
    )
    return summary, _read_lines(tmp_path / "out.jsonl"), reports


def test_every_kind_of_line_generates(generator, tmp_path):
    lines = [
        {"id": 1, "prompt": "The "},
        {"id": 2, "messages": MESSAGES},
        {"id": 3, "prompt_ids": [257, 84, 104, 101]},
    ]
    summary, out, reports = _generate(generator, tmp_path, lines, temperature=1.0, seed=5)
    assert summary == generate.Summary(generated=3, skipped=0) and reports == []
    tokenizer = tokenizers.get_tokenizer("byte")
    for line, result in zip(lines, out, strict=True):
        assert {k: result[k] for k in line} == line  # the input's fields come back as they were
        assert result["finish_reason"] in ("stop", "length")
        ids = result["completion_ids"]
        assert len(ids) == NEW if result["finish_reason"] == "length" else len(ids) < NEW
        assert tokenizer.eos_id not in ids  # the stop token is not part of the completion
        assert result["completion"] == tokenizer.decode(ids)


def test_greedy_output_is_the_samplers(run, generator, tmp_path):
    tokenizer = tokenizers.get_tokenizer("byte")
    texts = ["def ", "The quick brown", "x"]
    lines = [{"prompt": t} for t in texts] + [{"messages": MESSAGES}]
    _, out, _ = _generate(generator, tmp_path, lines)
    # The builtin template's rendering of MESSAGES, with the reply's header after it.
    texts.append("System: Be brief.\n\nUser: Hi?\n\nAssistant: ")
    prompts = [tokenizer.encode(t, add_bos=True, add_eos=False).tolist() for t in texts]
    expected = Sampler(runs.trained_model(run)).generate(
        prompts, max_new_tokens=NEW, stop_ids=[tokenizer.eos_id]
    )
    for result, completion in zip(out, expected, strict=True):
        stop = completion.finish_reason == "stop"
        assert result["completion_ids"] == completion.tokens[: -1 if stop else None].tolist()
        assert result["finish_reason"] == completion.finish_reason

    # The same run exported to a Hugging Face directory completes the same way.
    exported = str(tmp_path / "hf")
    export.export_hf(run, exported)
    _, from_hf, _ = _generate(generate.load(f"hf:{exported}"), tmp_path / "from_hf", lines)
    assert from_hf == out


def test_an_hf_directory_brings_its_tokenizer_and_chat_template(run, tmp_path):
    import tokenizers as hf

    exported = tmp_path / "hf"
    export.export_hf(run, str(exported))
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = hf.trainers.BpeTrainer(
        vocab_size=300,  # within the model's 384 ids
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["user assistant hello there"] * 10, trainer)
    tok.save(str(exported / "tokenizer.json"))
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": chatml}
    (exported / "tokenizer_config.json").write_text(json.dumps(config))

    generator = generate.load(f"hf:{exported}")
    end_of_turn, eos = tok.token_to_id("<|im_end|>"), tok.token_to_id("</s>")
    assert sorted(generator.stop_ids) == sorted([end_of_turn, eos])
    ids = generator.prompt_ids({"messages": [{"role": "user", "content": "hello"}]}, NEW)
    text = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert ids.tolist() == tok.encode(text).ids
    assert generator.prompt_ids({"prompt": "hello"}, NEW).tolist() == [
        tok.token_to_id("<s>"),
        *tok.encode("hello").ids,
    ]


def test_the_stop_token_is_dropped(generator):
    completion = Completion(np.array([72, 105, 258], np.int32), np.zeros(3, np.float32), "stop")
    line = generator.output_line({"prompt": "x"}, completion)
    assert line == {
        "prompt": "x",
        "completion": "Hi",
        "completion_ids": [72, 105],
        "finish_reason": "stop",
    }


def test_each_batch_samples_with_its_own_seed(generator, tmp_path):
    lines = [{"prompt": "same"}] * 2
    hot = dict(temperature=1.0, seed=3, batch_size=1)
    _, out, _ = _generate(generator, tmp_path / "a", lines, **hot)
    _, again, _ = _generate(generator, tmp_path / "b", lines, **hot)
    assert out == again  # one seed, the same output
    assert out[0]["completion_ids"] != out[1]["completion_ids"]  # batches 0 and 1 differ


def test_bad_lines_are_reported_by_line_and_skipped(generator, tmp_path):
    lines = [
        {"prompt": "first"},
        '{"prompt": "unclosed',
        {"text": "no field we know"},
        {"prompt": 3},
        {"prompt": ""},
        {"prompt_ids": [1, 10_000]},
        {"prompt_ids": [1, "2"]},
        {"messages": [{"role": "bot", "content": "hello"}]},
        {"messages": [{"role": "user", "content": None}]},
        {"prompt": "x", "prompt_ids": [1]},
        {"prompt": "y" * 60},  # 61 tokens + 8 new ones > the model's 64 positions
        {"prompt": "last"},
    ]
    summary, out, reports = _generate(generator, tmp_path, lines)
    assert summary == generate.Summary(generated=2, skipped=10)
    assert [r["prompt"] for r in out] == ["first", "last"]
    path = str(tmp_path / "prompts.jsonl")
    assert [r.split(": ", 1)[0] for r in reports] == [f"{path}:{n}" for n in range(2, 12)]
    assert "bad JSON" in reports[0] and "exactly one of" in reports[1]
    assert "outside the model's vocabulary" in reports[4] and "64 positions" in reports[9]


def test_existing_output_is_refused_and_failures_leave_nothing(generator, tmp_path):
    prompts = _write_lines(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    output = tmp_path / "out.jsonl"
    output.write_text("precious\n")
    with pytest.raises(FileExistsError, match="exists; remove it"):
        generate.generate_file(generator, prompts, str(output), generate.Settings())
    assert output.read_text() == "precious\n"

    bad = _write_lines(tmp_path / "bad.jsonl", [{"prompt": ""}])
    with pytest.raises(ValueError, match="no line of .* could be generated"):
        generate.generate_file(
            generator, bad, str(tmp_path / "new.jsonl"), generate.Settings(), report=print
        )
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "out.jsonl", "prompts.jsonl"]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_new_tokens=0), "--max_new_tokens=0 is invalid"),
        (dict(temperature=-1.0), "--temperature=-1.0 is invalid"),
        (dict(top_p=0.0), "--top_p=0.0 is invalid"),
        (dict(top_p=1.5), "--top_p=1.5 is invalid"),
        (dict(top_k=-1), "--top_k=-1 is invalid"),
        (dict(batch_size=0), "--batch_size=0 is invalid"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        generate.Settings(**settings).check()


def test_bad_model_specs_are_refused(run, tmp_path):
    with pytest.raises(ValueError, match="neither a directory nor hf:PATH"):
        generate.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        generate.load(f"hf:{tmp_path}")
    with pytest.raises(checkpoint.CheckpointError, match="not a jtrain workdir"):
        generate.load(str(tmp_path))


def test_command_line(run, tmp_path):
    prompts = _write_lines(tmp_path / "in.jsonl", [{"prompt": "a"}, "not json", {"prompt": "b"}])
    output = str(tmp_path / "out.jsonl")
    command = [sys.executable, "-m", "jtrain.generate", f"--model={run}", f"--prompts={prompts}"]
    flags = [f"--output={output}", f"--max_new_tokens={NEW}", "--batch_size=1"]
    result = subprocess.run(
        command + flags, cwd=REPO, env=main_env(1), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert f"{prompts}:2: bad JSON" in result.stderr
    assert "generated 2 lines" in result.stdout and "(1 skipped)" in result.stdout
    assert [line["prompt"] for line in _read_lines(output)] == ["a", "b"]

    again = subprocess.run(
        command + flags, cwd=REPO, env=main_env(1), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 1 and again.stderr.startswith("error: --output=")
