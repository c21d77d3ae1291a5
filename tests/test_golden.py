"""Golden numbers: the default model's loss and gradient norm at steps 1 and 10 on a fixed batch.

What a failure means (check them in this order):
- the batch hash: the data pipeline (tokenizer, packing, splitting, batch order) changed.
- step-1 loss: the forward pass or the parameter init changed (or the data, see above).
- step-1 grad_norm, with the step-1 loss unchanged: the backward pass changed (the loss
  normalisation, masking, a stop_gradient, remat).
- step 10, with step 1 unchanged: the optimizer or the schedule changed. Step 1 runs at the
  warmup's lr of 0, so only the 9 updates after it move the step-10 numbers.
A deliberate change updates these numbers in the same commit, saying why they moved; a change
no commit meant is a bug. Refactors must leave them alone.
"""

import hashlib

import jax
import numpy as np
import pytest

from jtrain import config as config_lib
from jtrain.data import pipeline
from jtrain.experiment import Experiment

# Made on CPython 3.11.7, jax 0.10.2 CPU, with 8 fake devices (tests/conftest.py) and one used.
GOLDEN = {
    1: {"loss": 5.849966049194336, "grad_norm": 10.564565658569336},
    10: {"loss": 3.866018772125244, "grad_norm": 2.0251097679138184},
}
# XLA on CPU runs float32 ops in a fixed order, so on one machine the numbers repeat exactly
# (also with 1 or 2 cores). Another CPU or XLA build may vectorise reductions differently and
# move the last bits: one device instead of 8 fake ones already moves step 10's grad_norm by
# 1.2e-7. Step 1 is one forward and backward pass: 1e-5 is ~100 float32 ulps. Nine Adam
# updates amplify such noise (Adam divides tiny gradients by their own tiny scale), hence 1e-4
# at step 10. Measured against these bounds: model.norm_eps 1e-5 -> 1e-6 moves the step-1 loss
# by 3e-5, a warmup of 51 steps instead of 50 moves step 10 by 2e-3, optimizer.b2 0.95 ->
# 0.951 its grad_norm by 3e-4. Weight decay barely acts at these warmup lrs (< 6e-4):
# weight_decay 0.1 -> 0.11 moves step 10 by < 1e-5, unseen here; test_optim checks decay.
RTOL = {1: 1e-5, 10: 1e-4}

# sha256 of the text the batch is cut from: CPython's pydoc_data.topics, which differs between
# Python versions. Elsewhere the golden numbers do not apply, and the tests skip.
CORPUS_SHA256 = "eb431921b14ece7922665095abadca0f972f3355535ff13f306b09f59c2026f0"
# sha256 of the batch's arrays, to tell a data change from a model change.
BATCH_SHA256 = "0a49cab6605436778b419a59d0c6614c835c1edb7bb8348fe328cfab6c59c310"


def _sha256(arrays) -> str:
    """Hashes dtypes, shapes and values, in any order: renaming a batch key is no data change."""
    digests = []
    for value in arrays:
        array = np.ascontiguousarray(value)
        digest = hashlib.sha256(f"{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
        digests.append(digest.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def _corpus_sha256() -> str:
    from pydoc_data.topics import topics

    return _sha256(
        np.frombuffer(f"{name}\0{text}".encode(), np.uint8) for name, text in topics.items()
    )


@pytest.fixture(scope="module")
def batch():
    if _corpus_sha256() != CORPUS_SHA256:
        pytest.skip("this Python's pydoc_data.topics is not the one the golden numbers used")
    config = config_lib.load("configs/default.py")
    iterator = pipeline.make_train_iterator(config)
    try:
        return next(iterator)
    finally:
        iterator.close()


@pytest.fixture(scope="module")
def metrics_by_step(batch):
    config = config_lib.load("configs/default.py")
    exp = Experiment.from_config(config, devices=jax.devices()[:1])
    state = exp.init_state()
    global_batch = exp.global_batch(batch)
    metrics_by_step = {}
    for step in range(1, max(GOLDEN) + 1):  # the same batch every step: one compile
        state, metrics = exp.train_step(state, global_batch)
        if step in GOLDEN:
            metrics_by_step[step] = {name: float(metrics[name]) for name in GOLDEN[step]}
    return metrics_by_step


def test_batch_is_the_golden_one(batch):
    assert _sha256(batch.values()) == BATCH_SHA256


@pytest.mark.parametrize("step, name", [(s, n) for s in GOLDEN for n in GOLDEN[s]])
def test_golden(metrics_by_step, step, name):
    got, expected = metrics_by_step[step][name], GOLDEN[step][name]
    assert got == pytest.approx(expected, rel=RTOL[step]), f"step {step} {name}: {got!r}"
