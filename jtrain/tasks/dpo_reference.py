"""DPO's precomputed reference (`dpo.precompute_reference=True`): the reference's log-probs
of every pair computed once, in batches, on the run's devices, then the reference dropped; a
fingerprint of the weights and the pairs tells when saved ones still hold."""

from __future__ import annotations

import base64
import hashlib
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jtrain import console, frozen_sources, pretrained
from jtrain.data.array_rows import ArrayExamples
from jtrain.models import lora
from jtrain.tasks import preference_examples
from jtrain.tasks.pair_logps import pair_rows, sequence_logps


def fingerprint_parts(task, pairs: dict[tuple[str, str], ArrayExamples]) -> dict:
    """What the reference log-probs depend on: the weights (their spec and version), the
    model they are loaded into, and the pairs' tokens and completion masks."""
    spec = task.reference_spec()
    model = {k: v for k, v in task.config.model.to_dict().items() if k != "init_from"}
    return {
        "reference": {"spec": spec, "version": frozen_sources.version(spec)},
        "model": model,
        "data": {
            f"{src} {split}": preference_examples.content_hash(v)
            for (src, split), v in pairs.items()
        },
    }


def compute(task, exp, pairs) -> dict[tuple[str, str], np.ndarray]:
    """Runs the reference (loaded sharded like the model) over every pair in batches."""
    started = time.perf_counter()
    spec = task.reference_spec()
    weights = pretrained.load(spec, exp.abstract_base)
    forward = _reference_forward(task, exp)
    size = task.config.train.batch_size

    def put(x):  # every process holds every pair: each places its devices' rows
        return jax.make_array_from_callback(x.shape, exp.batch_sharding, lambda i: x[i])

    out = {}
    for key, examples in pairs.items():
        tokens, completion = examples.features["tokens"], examples.features["completion"]
        parts = []  # dispatched before any is read
        for start in range(0, len(examples), size):
            batch = [_padded(x[start : start + size], size) for x in (tokens, completion)]
            parts.append(forward(weights, *map(put, batch)))
        logps = np.concatenate([np.asarray(p) for p in parts]) if parts else np.zeros((0, 2))
        out[key] = logps[: len(examples)].astype(np.float32)
    jax.tree.map(lambda x: x.delete(), weights)  # no reference is kept while training
    count = sum(len(v) for v in out.values())
    console.status(
        f"jtrain: reference log-probs of {count} pairs computed from {spec} in "
        f"{time.perf_counter() - started:.1f}s",
    )
    return out


def _reference_forward(task, exp):
    """jit(weights, tokens, completion [B, 2, L + 1]) -> the reference's log-probs [B, 2],
    with the reference built exactly as the step would build it."""
    lora_cfg = lora.LoRAConfig.from_config(task.config.model)
    as_base = task._reference_is_base()

    def forward(weights, tokens, completion):
        model = task.make_model(nnx.Rngs(0))  # its initial values are all overwritten
        nnx.update(model, weights)
        if as_base:  # the base as the run stores it (bfloat16, int8), adapters off
            model = lora.adapters_off(lora.attach(model, lora_cfg, nnx.Rngs(0)))
        batch = {"tokens": tokens, "completion": completion}
        logps, _ = sequence_logps(model, pair_rows(batch, "tokens"), pair_rows(batch, "completion"))
        return logps.reshape(-1, 2)

    weight_shardings = jax.tree.map(lambda a: a.sharding, exp.abstract_base)
    return jax.jit(
        forward,
        in_shardings=(weight_shardings, exp.batch_sharding, exp.batch_sharding),
        out_shardings=NamedSharding(exp.mesh, PartitionSpec()),  # on every process
    )


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    """x with zero rows (no completion token: log-prob 0) up to `size` rows."""
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_logps(table: dict[tuple[str, str], np.ndarray]) -> dict[str, dict[str, str]]:
    """{source: {split: base64 of little-endian float32 [N, 2]}}: exact and compact."""
    out: dict[str, dict[str, str]] = {}
    for (source, split), logps in table.items():
        raw = np.ascontiguousarray(logps, "<f4").tobytes()
        out.setdefault(source, {})[split] = base64.b64encode(raw).decode("ascii")
    return out


def decode_logps(encoded: dict[str, dict[str, str]]) -> dict[tuple[str, str], np.ndarray]:
    """The saved "logps" of reference_logps.json: [N, 2] log-probs by (source, split)."""
    return {
        (source, split): np.frombuffer(base64.b64decode(text), "<f4").reshape(-1, 2)
        for source, splits in encoded.items()
        for split, text in splits.items()
    }
