"""Profiles of language-model runs (task=lm): per document, its length, the final model's
loss on its first `train.seq_len` tokens, and its counts of the reference's most frequent
tokens (the token distribution; the domain classifier reads their frequencies).

Documents are the unit, not tokens: tokens of one document are not independent, so tests
over pooled tokens would alarm on text from the very same source (`stats.token_test`
permutes documents). At most `DOCUMENTS` documents (a random choice) are profiled: the
loss costs a forward pass each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jtrain.data import sources
from jtrain.drift.profile import Column, ProfileError, Sample
from jtrain.drift.profilers import register
from jtrain.tasks.lm import token_cross_entropy

DOCUMENTS = 1000
TOP_TOKENS = 255  # the reference's most frequent tokens; every other token counts as one more
BATCH = 32


def _documents(task, source: str, splits) -> list[np.ndarray]:
    docs = []
    for spec in task.source_specs(source):
        for split in splits:
            part = task.examples(spec, split)
            docs.extend(part.doc(i) for i in range(len(part)))
    return docs


def _chosen(docs: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    if len(docs) <= DOCUMENTS:
        return docs
    keep = np.sort(np.random.default_rng(seed).choice(len(docs), DOCUMENTS, replace=False))
    return [docs[i] for i in keep]


def _losses(model, docs: list[np.ndarray], seq_len: int) -> np.ndarray:
    """Mean next-token loss of each document's first seq_len + 1 tokens (one compile)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def per_doc(state, tokens_BxL1, weight_BxL):
        logits = nnx.merge(graphdef, state)(tokens_BxL1[:, :-1])
        nll = token_cross_entropy(logits, tokens_BxL1[:, 1:]) * weight_BxL
        return jnp.sum(nll, axis=1) / jnp.maximum(jnp.sum(weight_BxL, axis=1), 1.0)

    out = []
    for start in range(0, len(docs), BATCH):
        tokens = np.zeros((BATCH, seq_len + 1), np.int32)
        weight = np.zeros((BATCH, seq_len), np.float32)
        for row, doc in enumerate(docs[start : start + BATCH]):
            doc = doc[: seq_len + 1]
            tokens[row, : len(doc)] = doc
            weight[row, : max(len(doc) - 1, 0)] = 1.0
        out.append(per_doc(state, tokens, weight))
    return np.concatenate([np.asarray(x) for x in out])[: len(docs)].astype(np.float64)


def _counts(docs: list[np.ndarray], vocabulary: np.ndarray) -> np.ndarray:
    """[documents, len(vocabulary) + 1]: counts of each listed token, then of all others."""
    index = np.full(
        int(max(vocabulary.max(initial=0), *(d.max(initial=0) for d in docs))) + 1,
        len(vocabulary),
        np.int64,
    )
    index[vocabulary] = np.arange(len(vocabulary))
    return np.stack([np.bincount(index[d], minlength=len(vocabulary) + 1) for d in docs])


def _sample(task, model, docs: list[np.ndarray], vocabulary: np.ndarray) -> Sample:
    counts = _counts(docs, vocabulary)
    lengths = np.array([len(d) for d in docs], np.float64)
    losses = _losses(model, docs, int(task.config.train.seq_len))
    frequencies = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    embedding = np.concatenate([frequencies, np.log1p(lengths)[:, None]], axis=1)
    columns = {
        "document_length": Column("document_length", "numeric", "feature", lengths),
        "tokens": Column("tokens", "tokens", "feature", counts),
        "loss": Column("loss", "numeric", "loss", losses),
    }
    return Sample(columns, embedding, len(docs), {"vocabulary": vocabulary.tolist()})


@register("lm")
class TextProfiler:
    """Token documents of language models."""

    def reference(self, task, model) -> Sample:
        docs = _chosen(_documents(task, task.config.data.source, ["train"]))
        if not docs:
            raise ProfileError("the train split has no documents to profile")
        totals = np.bincount(np.concatenate(docs))
        vocabulary = np.argsort(-totals, kind="stable")[:TOP_TOKENS]
        vocabulary = np.sort(vocabulary[totals[vocabulary] > 0])
        return _sample(task, model, docs, vocabulary)

    def current(self, task, model, source: str, meta: dict) -> Sample:
        try:
            docs = _chosen(_documents(task, source, sources.SPLITS))
        except ValueError as err:
            raise ProfileError(f"--data={source}: {err}") from None
        if not docs:
            raise ProfileError(f"--data={source} has no documents to compare")
        return _sample(task, model, docs, np.asarray(meta["vocabulary"], np.int64))
