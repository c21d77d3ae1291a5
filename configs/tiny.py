"""Smoke-test variant of the default: a tiny model and a few steps (seconds on a CPU)."""

import ml_collections

from jtrain.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config shrunk for smoke runs and tests."""
    c = default.get_config()
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.n_heads = 8
    c.model.n_kv_heads = 4  # divisible by a tensor axis of 4
    c.model.head_dim = 8
    c.model.d_ff = 128
    c.train.steps = 20
    c.train.batch_size = 16
    c.train.seq_len = 32
    c.train.log_every = 5
    c.eval.every_steps = 10
    c.eval.steps = 2
    c.eval.sample_tokens = 16
    c.schedule.warmup_steps = 5
    return c
