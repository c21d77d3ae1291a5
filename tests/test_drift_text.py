"""Drift of a language model's text: a tiny run on the pydoc documentation saves a profile of
its documents (lengths, token distribution, per-document loss); the standard library's source
code drifts (tokens, loss, the domain classifier), held-back documentation does not."""

import json

import pytest

from jtrain.data import embedded
from jtrain.drift import build, profile
from tests.conftest import tiny_trained_run


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    return tiny_trained_run(tmp_path_factory, drift__profile=True)  # the end-of-run hook


def test_the_profile_holds_lengths_tokens_and_losses(lm_run):
    content, sample = profile.load(lm_run)
    assert {c["name"]: c["role"] for c in content["columns"]} == {
        "document_length": "feature",
        "tokens": "feature",
        "loss": "loss",
    }
    assert content["rows"] == len(embedded.pydoc_topics()["train"])
    assert sample.columns["tokens"].values.shape[1] == len(sample.meta["vocabulary"]) + 1
    assert (sample.columns["loss"].values > 0).all()


def test_source_code_drifts_from_documentation(lm_run):
    report, _, _ = build.drift_report(lm_run, "python_stdlib", permutations=10)
    assert report["drift"] and "tokens" in report["drifting_features"]
    assert report["domain_classifier"]["drift"]


def test_held_back_documentation_does_not_drift(lm_run, tmp_path):
    held = tmp_path / "held.jsonl"
    topics = embedded.pydoc_topics()
    with open(held, "w") as f:
        for text in topics["val"] + topics["test"]:
            f.write(json.dumps({"text": text}) + "\n")
    report, _, _ = build.drift_report(lm_run, f"files:{held}", permutations=10)
    assert not report["drift"], report["verdict"]
