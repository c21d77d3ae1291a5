"""jtrain's XLA flags for NVIDIA GPUs: set only for a GPU run, never over the user's own, off
with JTRAIN_XLA_GPU_FLAGS=0, set before jax starts its backend, and every one of them a flag
that the installed jaxlib knows (XLA stops the process at backend start for one it does not)."""

import os
import subprocess
import sys

import pytest

from jtrain import cli, xla_flags
from jtrain.errors import UserError

OURS = list(xla_flags.GPU_FLAGS)


def test_flag_names_reads_every_form():
    value = "--a=1 --b  --c='x y' -d=2 --xla_dump_to=/tmp/x"
    assert xla_flags.flag_names(value) == {"a", "b", "c", "d", "xla_dump_to"}
    assert xla_flags.flag_names("") == set()


def test_merged_keeps_the_users_flags_and_values():
    lhs = "--xla_gpu_enable_latency_hiding_scheduler"
    users = f"{lhs}=false --xla_dump_to=/tmp/d"
    merged = xla_flags.merged(users, OURS)
    assert merged.endswith(users)  # the user's value of a flag we also set is the one kept
    names = merged.split()
    assert f"{lhs}=true" in OURS and f"{lhs}=true" not in names
    assert set(OURS) - {f"{lhs}=true"} <= set(names)
    assert len(names) == len(OURS) + 1  # each flag once
    assert xla_flags.merged("", OURS) == " ".join(OURS)
    assert xla_flags.merged(merged, OURS) == merged  # a child jtrain process adds nothing


@pytest.fixture
def gpu_machine(monkeypatch):
    """A machine whose jax has its CUDA plugin installed."""
    monkeypatch.setattr(xla_flags, "_installed", lambda module: True)


def test_apply_sets_the_flags_for_a_gpu_run(gpu_machine):
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    added = xla_flags.apply(environ)
    assert environ["XLA_FLAGS"] == " ".join(OURS) + " --xla_dump_to=/tmp/d"
    assert len(added) == len(OURS)
    for platforms in ("cuda", "cuda,cpu", "gpu", ""):
        environ = {"JAX_PLATFORMS": platforms}
        assert xla_flags.apply(environ) and environ["XLA_FLAGS"] == " ".join(OURS)


@pytest.mark.parametrize(
    "environ",
    [
        {"JTRAIN_XLA_GPU_FLAGS": "0"},
        {"JTRAIN_XLA_GPU_FLAGS": "off"},
        {"JAX_PLATFORMS": "cpu"},
        {"JAX_PLATFORMS": "tpu"},
        {"CUDA_VISIBLE_DEVICES": ""},
    ],
)
def test_apply_leaves_xla_flags_alone_when_off_or_not_on_a_gpu(gpu_machine, environ):
    environ = {**environ, "XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    assert xla_flags.apply(environ) == []
    assert environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"


def test_apply_does_nothing_without_jaxs_cuda_plugin():
    environ = {}
    assert xla_flags.apply(environ) == [] and "XLA_FLAGS" not in environ  # this CPU machine


def test_a_bad_switch_value_is_a_one_line_error():
    with pytest.raises(UserError, match="JTRAIN_XLA_GPU_FLAGS='maybe' is invalid: use 1"):
        xla_flags.apply({"JTRAIN_XLA_GPU_FLAGS": "maybe"})


def test_every_command_applies_them_before_absl_runs(monkeypatch):
    order = []
    monkeypatch.setattr(xla_flags, "apply", lambda: order.append("flags"))
    monkeypatch.setattr(cli.app, "run", lambda main, flags_parser: order.append("main"))
    cli.run(lambda argv: None)
    assert order == ["flags", "main"]


def _start_backend(code: str, xla: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": xla, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_installed_jaxlib_knows_every_flag():
    start = "import jax; jax.devices()"
    # The check can fail: XLA parses its GPU flags on every backend and stops at an unknown one.
    bogus = _start_backend(start, "--xla_gpu_no_such_flag_for_jtrain=true")
    assert bogus.returncode != 0 and "Unknown flag in XLA_FLAGS" in bogus.stderr
    ours = _start_backend(start, " ".join(OURS))
    assert ours.returncode == 0, ours.stderr[-2000:]


def test_importing_the_commands_starts_no_backend():
    """cli.run sets XLA_FLAGS after the command's module is imported: that import must leave
    jax's backend unstarted, or the flags would come too late."""
    code = (
        "import jtrain.main, jtrain.generate, jtrain.export, jtrain.serve, jtrain.predict\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge._backends, 'a backend was started at import'\n"
    )
    result = _start_backend(code, "")
    assert result.returncode == 0, result.stderr[-2000:]
