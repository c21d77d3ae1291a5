"""Tests for jtrain.data.tokenizers and the train_tokenizer CLI, on tokenizers built here."""

import gzip
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece
import tokenizers as hf
import zstandard

from jtrain.data import readers, tokenizers, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
CORPUS = "".join(topics[key] for key in sorted(topics))[:24_000]
NON_ASCII = "héllo wörld — 你好 🙂 naïve café"
TEXTS = ["The quick brown fox jumps over the lazy dog.", NON_ASCII]


def _byte_level_bpe(special_tokens: list[str], vocab_size: int = 400) -> hf.Tokenizer:
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tokenizer.json with unusual specials named dict-style in tokenizer_config.json."""
    directory = tmp_path_factory.mktemp("hf")
    tok = _byte_level_bpe(["<|unk|>", "<|start|>", "<|stop|>", "<|padding|>"])
    # Both must be ignored: jtrain adds BOS/EOS itself and never pads inside encode.
    tok.post_processor = hf.processors.TemplateProcessing(
        single="<|start|> $A <|stop|>", special_tokens=[("<|start|>", 1), ("<|stop|>", 2)]
    )
    tok.enable_padding(pad_id=3, pad_token="<|padding|>", length=64)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        role: {"__type": "AddedToken", "content": token, "special": True}
        for role, token in [
            ("bos_token", "<|start|>"),
            ("eos_token", "<|stop|>"),
            ("pad_token", "<|padding|>"),
        ]
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory):
    """A GPT-2-like tokenizer.json: `<|endoftext|>` is its only special token; no config."""
    path = tmp_path_factory.mktemp("gpt2") / "tokenizer.json"
    _byte_level_bpe(["<|endoftext|>"]).save(str(path))
    return path


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    lines = [line for line in CORPUS.splitlines() if line.strip()] + [NON_ASCII] * 3
    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=f,
            vocab_size=300,
            model_type="bpe",
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            character_coverage=1.0,
            normalization_rule_name="identity",
            minloglevel=2,
        )
    return path


@pytest.fixture(params=["byte", "huggingface", "gpt2", "sentencepiece"])
def spec(request):
    """A spec of each kind, as a user would write it."""
    return {
        "byte": lambda: "byte",
        "huggingface": lambda: str(request.getfixturevalue("hf_dir")),
        "gpt2": lambda: str(request.getfixturevalue("gpt2_file")),
        "sentencepiece": lambda: str(request.getfixturevalue("sp_file")),
    }[request.param]()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(spec, text):
    tok = tokenizers.get_tokenizer(spec)
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert np.all((ids >= 0) & (ids < tok.vocab_size))
    assert tok.decode(ids) == text
    body = tok.encode(text, add_bos=False, add_eos=False)
    np.testing.assert_array_equal(ids[1:-1], body)
    assert tok.decode(body) == text


def test_bos_eos_flags(spec):
    tok = tokenizers.get_tokenizer(spec)
    body = tok.encode(TEXTS[0], add_bos=False, add_eos=False).tolist()
    assert tok.bos_id not in body and tok.eos_id not in body
    assert tok.encode(TEXTS[0], add_eos=False).tolist() == [tok.bos_id, *body]
    assert tok.encode(TEXTS[0], add_bos=False).tolist() == [*body, tok.eos_id]
    assert tok.encode("").tolist() == [tok.bos_id, tok.eos_id]


def test_decode_drops_specials(spec):
    tok = tokenizers.get_tokenizer(spec)
    body = tok.encode(NON_ASCII, add_bos=False, add_eos=False).tolist()
    noisy = [tok.bos_id, tok.pad_id, *body, tok.eos_id, tok.pad_id, tok.vocab_size + 7, -1]
    assert tok.decode(noisy) == NON_ASCII
    assert tok.decode(np.array([body])) == NON_ASCII  # any shape is flattened


def test_encode_batch_equals_encode(spec):
    tok = tokenizers.get_tokenizer(spec)
    texts = [*TEXTS, "", CORPUS[:2000]]
    for flags in [{}, {"add_bos": False}, {"add_eos": False}]:
        batch = tok.encode_batch(texts, **flags)
        assert len(batch) == len(texts)
        for got, text in zip(batch, texts, strict=True):
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, tok.encode(text, **flags))


def test_describe(spec):
    tok = tokenizers.get_tokenizer(spec)
    info = json.loads(json.dumps(tok.describe()))
    ids = {k: info[k] for k in ["vocab_size", "bos_id", "eos_id", "pad_id"]}
    assert ids == {
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
    }
    if spec == "byte":
        assert info == {**ids, "type": "byte", "path": None, "sha256": None}
    else:
        path = Path(info["path"])
        assert path.is_file() and info["type"] in ("huggingface", "sentencepiece")
        assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_cached_and_picklable(spec):
    tok = tokenizers.get_tokenizer(spec)
    assert tokenizers.get_tokenizer(spec) is tok
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.describe() == tok.describe()
    np.testing.assert_array_equal(copy.encode(NON_ASCII), tok.encode(NON_ASCII))


def test_kinds_and_special_ids(hf_dir, gpt2_file, sp_file):
    # Dict-style specials from tokenizer_config.json; the directory resolves to tokenizer.json.
    tok = tokenizers.get_tokenizer(str(hf_dir))
    assert isinstance(tok, tokenizers.HuggingFaceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 400)
    assert tok.describe()["path"] == str(hf_dir / "tokenizer.json")
    # GPT-2 style: the one `<|endoftext|>` token is BOS, EOS and PAD.
    gpt2 = tokenizers.get_tokenizer(str(gpt2_file))
    assert gpt2.bos_id == gpt2.eos_id == gpt2.pad_id == 0
    sp = tokenizers.get_tokenizer(str(sp_file))
    assert isinstance(sp, tokenizers.SentencePieceTokenizer)
    assert (sp.bos_id, sp.eos_id, sp.pad_id, sp.vocab_size) == (1, 2, 3, 300)
    assert tokenizers.tokenizer_names() == ("byte",)


def test_specials_from_common_tokens(tmp_path):
    # No config: BOS/EOS/PAD are found by their usual spellings in the vocabulary.
    _byte_level_bpe(["<unk>", "<s>", "</s>", "[PAD]"]).save(str(tmp_path / "tokenizer.json"))
    tok = tokenizers.get_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)


def test_bad_specs(tmp_path, hf_dir):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(ValueError, match=f"'{missing}'.*not a built-in name.*allowed: byte"):
        tokenizers.get_tokenizer(str(missing))
    with pytest.raises(ValueError, match="'bpe'.*allowed: byte"):
        tokenizers.get_tokenizer("bpe")
    with pytest.raises(ValueError, match=f"Directory {tmp_path} holds no tokenizer"):
        tokenizers.get_tokenizer(str(tmp_path))
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text('{"model": ')
    with pytest.raises(ValueError, match=f"Cannot load Hugging Face tokenizer {corrupt}"):
        tokenizers.get_tokenizer(str(corrupt))
    (tmp_path / "bad.model").write_bytes(b"\x00not a model")
    with pytest.raises(ValueError, match="Cannot load SentencePiece model .*bad.model"):
        tokenizers.get_tokenizer(str(tmp_path / "bad.model"))
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="vocab.txt is neither .json nor .model"):
        tokenizers.get_tokenizer(str(tmp_path / "vocab.txt"))


def test_config_naming_unknown_token(tmp_path, gpt2_file):
    (tmp_path / "tokenizer.json").write_bytes(gpt2_file.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    with pytest.raises(ValueError, match="eos_token='</s>', which is not in the vocabulary"):
        tokenizers.get_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="Cannot read tokenizer config .*tokenizer_config.json"):
        tokenizers.HuggingFaceTokenizer(tmp_path / "tokenizer.json")


def _write_inputs(directory: Path) -> list[str]:
    """Writes CORPUS as one .txt, one .jsonl.gz (with a malformed line) and one .txt.zst."""
    third = len(CORPUS) // 3
    parts = [CORPUS[:third], CORPUS[third : 2 * third], CORPUS[2 * third :]]
    (directory / "a.txt").write_text(parts[0], encoding="utf-8")
    docs = parts[1].split("\n\n")
    lines = [json.dumps({"text": doc}) for doc in docs] + ["{not json", '{"other": 1}', ""]
    with gzip.open(directory / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    zstd = zstandard.ZstdCompressor().compress(parts[2].encode("utf-8"))
    (directory / "c.txt.zst").write_bytes(zstd)
    return [str(directory / "*.txt"), str(directory / "*.gz"), str(directory / "c.*")]


def test_train_tokenizer_cli(tmp_path):
    inputs = _write_inputs(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jtrain.data.train_tokenizer", f"--output={out}"]
    command += [f"--input={pattern}" for pattern in inputs] + ["--vocab_size=400"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "vocab size: 400" in result.stdout
    assert "skipped 2 malformed records" in result.stdout
    tok = tokenizers.get_tokenizer(str(out))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 400)
    ids = tok.encode(CORPUS, add_bos=False, add_eos=False)
    assert len(CORPUS.encode("utf-8")) / ids.size > 1.5
    assert tok.decode(tok.encode(NON_ASCII)) == NON_ASCII
    # Never overwrites: a second run into the same directory is refused with a message.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_train_tokenizer_summary_and_errors(tmp_path):
    inputs = _write_inputs(tmp_path)
    summary = train_tokenizer.train(inputs, tmp_path / "out", vocab_size=400, show_progress=False)
    stats = summary.stats
    jsonl_docs = CORPUS[len(CORPUS) // 3 : 2 * (len(CORPUS) // 3)].split("\n\n")
    assert stats.documents == 2 + len(jsonl_docs)  # each (small) text file is one document
    assert stats.bytes == len(CORPUS.encode("utf-8")) - 2 * (len(jsonl_docs) - 1)
    assert stats.malformed == 2 and len(stats.examples) == 2
    assert "b.jsonl.gz:" in stats.examples[0]
    assert summary.bytes_per_token > 1.5 and summary.sample_bytes == stats.bytes
    with pytest.raises(ValueError, match="'.*missing/\\*.txt' matches no files"):
        train_tokenizer.train([str(tmp_path / "missing/*.txt")], tmp_path / "o2")
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer.train(inputs, tmp_path / "o3", vocab_size=100)
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bad.txt.gz: cannot read it as text"):
        train_tokenizer.train([str(tmp_path / "bad.txt.gz")], tmp_path / "o4", show_progress=False)


def test_read_documents_formats_and_bad_records(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "one"}\n{"body": 2}\n')
    (tmp_path / "e.txt").write_bytes(b"ok line\nbad \xff byte\nlast")
    (tmp_path / "f.ndjson.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b'{"body": "three"}\n')
    )
    pq.write_table(pa.table({"body": ["four", None]}), tmp_path / "g.parquet")
    stats = train_tokenizer.ReadStats()
    files = train_tokenizer.expand_inputs([str(tmp_path)])  # a directory is walked
    docs = list(train_tokenizer.read_documents(files, "body", stats))
    assert docs == ["one", "ok line\n", "last", "three", "four"]  # a bad line splits the text
    assert (stats.documents, stats.malformed, stats.bad_utf8) == (5, 2, 1)
    assert stats.bytes == sum(len(doc.encode("utf-8")) for doc in docs)
    assert "d.jsonl:2: field 'body' is int" in stats.examples[0]
    assert "e.txt:2: invalid UTF-8 byte 0xff" in stats.examples[1]
    assert "g.parquet:2: field 'body' is null" in stats.examples[2]


def test_read_documents_streams_text_in_whole_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(train_tokenizer, "_CHUNK_BYTES", 1000)
    (tmp_path / "big.txt").write_bytes(b"\xef\xbb\xbf" + CORPUS.encode("utf-8"))
    stats = train_tokenizer.ReadStats()
    docs = list(train_tokenizer.read_documents([str(tmp_path / "big.txt")], "text", stats))
    assert "".join(docs) == CORPUS  # byte order mark dropped, nothing else
    assert len(docs) > len(CORPUS.encode("utf-8")) // 2000 and stats.documents == len(docs)
    assert all(doc.endswith("\n") for doc in docs[:-1])
    with pytest.raises(ValueError, match="chunk_bytes must be None or >= 1"):
        readers.iter_file_rows(str(tmp_path / "big.txt"), chunk_bytes=0)
