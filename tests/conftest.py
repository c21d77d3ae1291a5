"""Test setup: 8 fake CPU devices, set before jax initialises so every test can build meshes;
and the helpers several test files share (import them as `from tests.conftest import ...`)."""

import atexit
import os
import shutil
import struct
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's compiled programs are cached on disk for this session, shared with the subprocesses
# the tests start (they inherit the environment): most tests compile the same tiny steps, and
# a hit costs a file read instead of seconds of compiling. The cache starts empty each session
# and is deleted after it: tests never reuse programs from another checkout or version.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="jtrain-tests-xla-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# LLVM's optimisations of XLA's CPU code are off: compiling is most of a tiny test's time, and
# this halves it (a tiny train step compiles in 5 s of CPU instead of 10). XLA's own graph
# passes (fusion, layout, sharding) still run, so the programs tested are the ones users run,
# lowered to slower machine code; what the tests check (equal losses across meshes, resumes,
# parity with transformers and TRL within stated tolerances) holds at any optimisation level.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(workdir, *flags) -> list[str]:
    """The command line of `python -m jtrain.main` in workdir with these flags."""
    return [sys.executable, "-m", "jtrain.main", f"--workdir={workdir}", *flags]


def main_env(devices: int = 2) -> dict[str, str]:
    """The environment of a CLI run on `devices` fake CPU devices."""
    return {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}


def run_main(workdir, *flags, timeout=300, devices=2) -> subprocess.CompletedProcess:
    """Runs the CLI to completion; the result holds its return code, stdout and stderr."""
    return subprocess.run(
        main_command(workdir, *flags),
        cwd=REPO,
        env=main_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_main(workdir, *flags, devices=2) -> subprocess.Popen:
    """Starts the CLI in the background (to signal or kill it)."""
    return subprocess.Popen(
        main_command(workdir, *flags),
        cwd=REPO,
        env=main_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def load_config(recipe: str, **overrides):
    """configs/<recipe> with `section__name=value` overrides (a key may be new: model keys).

    The end-of-run drift profile is off unless a test turns it on (`drift__profile=True`):
    an image run's takes a forward pass over its whole train split."""
    from jtrain import config as config_lib

    config = config_lib.load(os.path.join(REPO, "configs", recipe))
    if "drift" in config:
        config.drift.profile = False
    for key, value in overrides.items():
        *sections, name = key.split("__")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    return config


def tiny_config(**overrides):
    """configs/tiny.py without the end-of-run sample; `section__name=value` overrides."""
    return load_config("tiny.py", **{"eval__sample_tokens": 0, **overrides})


def train_losses(workdir) -> dict[int, float]:
    """The last logged train loss of every step (a resumed run logs some steps twice)."""
    from jtrain.metrics import read_metrics

    events = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return {e["step"]: e["loss"] for e in events if e["split"] == "train" and "loss" in e}


def greedy_by_full_forward(model, prompt, new_tokens: int, width: int = 64) -> list[int]:
    """Greedy continuation the slow way, the whole sequence again for every token: a
    reference for the KV-cache sampler. Rows are padded to `width` after their end (causal
    attention never looks there), so the forward pass compiles once."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    forward = jax.jit(lambda tokens: model(tokens))
    tokens = list(prompt)
    for _ in range(new_tokens):
        row = np.zeros((1, width), np.int32)
        row[0, : len(tokens)] = tokens
        tokens.append(int(jnp.argmax(forward(row)[0, len(tokens) - 1])))
    return tokens[len(prompt) :]


def tiny_trained_run(tmp_path_factory, **overrides) -> str:
    """A 2-step tiny run's workdir (positions capped at 64 tokens): a model to generate with."""
    from jtrain.run import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(
        train__steps=2,
        eval__every_steps=0,
        checkpoint__every_steps=0,
        model__max_seq_len=64,
        **overrides,
    )
    train_and_evaluate(config, workdir)
    return workdir


def read_tfrecords(path):
    """Yields the payloads of a TFRecord file (length, crc, data, crc framing)."""
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        yield data[offset + 12 : offset + 12 + length]
        offset += 12 + length + 4
