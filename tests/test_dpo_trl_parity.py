"""task="dpo" end to end against TRL 1.16: jtrain evaluating a JSONL file of pairs (all three
TRL formats) with a tiny HF Llama policy, another as reference and a word-level HF tokenizer
with a chat template gives TRL's DPOTrainer eval loss and metrics, and TRL's token ids for
every pair. The golden directory tests/golden/dpo_e2e/ (models, tokenizer, pairs, TRL's
numbers) is written by tests/golden/make_trl_dpo_e2e_golden.py."""

import importlib.util
import json
import os

import ml_collections
import numpy as np
import pytest

from jtrain import run
from jtrain.tasks import dpo_losses, preference_examples
from tests.conftest import tiny_config

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
E2E = os.path.join(GOLDEN_DIR, "dpo_e2e")
PAIRS = os.path.join(E2E, "pairs.jsonl")
TOKENIZER = os.path.join(E2E, "tokenizer")
SOURCE = f"files:train={PAIRS};val={PAIRS};test={PAIRS}"  # every pair in every split
SEQ_LEN = 32
METRICS = dpo_losses.METRICS
TOL = 1e-5


def _golden() -> dict:
    with open(os.path.join(E2E, "trl.json")) as f:
        return json.load(f)


GOLDEN = _golden()


def dpo_config(loss: str):
    """The tiny DPO run over the golden pairs: TRL's models, tokenizer and chat template."""
    config = tiny_config(
        task="dpo",
        data__source=SOURCE,
        data__tokenizer=TOKENIZER,
        data__chat_template="tokenizer",
        model__init_from=f"hf:{os.path.join(E2E, 'policy')}",
        train__seq_len=SEQ_LEN,
        train__batch_size=8,  # 9 pairs: two eval batches, the second padded
        eval__steps=-1,
    )
    config.dpo = ml_collections.ConfigDict(
        {"loss": loss, "beta": GOLDEN["beta"], "reference": f"hf:{os.path.join(E2E, 'reference')}"}
    )
    return config


def _close(ours: float, trl: float, what: str) -> None:
    assert abs(ours - trl) <= TOL * max(1.0, abs(trl)), f"{what}: jtrain {ours!r}, TRL {trl!r}"


@pytest.mark.parametrize("loss", sorted(GOLDEN["trl"]))
def test_eval_matches_trl(loss, tmp_path):
    results = run.evaluate(dpo_config(loss), str(tmp_path))
    trl = GOLDEN["trl"][loss]
    assert results["loss_weight"] == len(GOLDEN["ids"])  # every pair, none dropped
    _close(results["loss"], trl["loss"], "loss")
    for name in METRICS:
        _close(results[name], trl[name], name)


def _jtrain_ids() -> list[dict]:
    """jtrain's (prompt, chosen, rejected) ids of each val pair, read back from its rows."""
    (spec,) = preference_examples.parse_spec(SOURCE)
    pairs = preference_examples.load_pairs(spec, "val", TOKENIZER, "tokenizer", SEQ_LEN + 1)
    out = []
    for tokens, completion, lengths in zip(
        pairs.features["tokens"],
        pairs.features["completion"],
        pairs.features["lengths"],
        strict=True,
    ):
        starts = [int(np.argmax(mask)) for mask in completion]
        assert starts[0] == starts[1], "chosen and rejected share the prompt"
        ids = [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)]
        for mask, n, start in zip(completion, lengths, starts, strict=True):
            assert mask[start:n].all() and not mask[n:].any()  # the completion runs to the end
        out.append(
            {
                "prompt_ids": ids[0][: starts[0]],
                "chosen_ids": ids[0][starts[0] :],
                "rejected_ids": ids[1][starts[1] :],
            }
        )
    return out


def test_token_ids_match_trl():
    ours = _jtrain_ids()
    assert len(ours) == len(GOLDEN["ids"])
    for i, (mine, trl, kind) in enumerate(zip(ours, GOLDEN["ids"], GOLDEN["formats"], strict=True)):
        assert mine == trl, f"pair {i} ({kind})"


def test_golden_covers_every_format():
    assert set(GOLDEN["formats"]) == {
        "explicit_text",
        "explicit_messages",
        "implicit_text",
        "implicit_messages",
    }
    assert set(GOLDEN["trl"]) == {"sigmoid", "ipo"}


def test_generator_reproduces_golden(tmp_path):
    """The generator, re-run with this TRL, writes the committed files and numbers."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    versions = {"trl": trl.__version__, "transformers": transformers.__version__}
    if versions != GOLDEN["versions"]:
        pytest.skip(f"the golden files are from {GOLDEN['versions']}, not {versions}")
    path = os.path.join(GOLDEN_DIR, "make_trl_dpo_e2e_golden.py")
    spec = importlib.util.spec_from_file_location("make_trl_dpo_e2e_golden", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.build_golden(str(tmp_path))
    assert fresh["ids"] == GOLDEN["ids"] and fresh["formats"] == GOLDEN["formats"]
    for loss, values in GOLDEN["trl"].items():
        for key, value in values.items():
            np.testing.assert_allclose(fresh["trl"][loss][key], value, rtol=1e-6, atol=1e-6)
    for name in ("pairs.jsonl", "tokenizer/tokenizer.json", "policy/model.safetensors"):
        with open(tmp_path / name, "rb") as new, open(os.path.join(E2E, name), "rb") as old:
            assert new.read() == old.read(), name
