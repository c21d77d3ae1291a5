"""Compiling the real train step for TPU topologies on this CPU host (jtrain.aot), and the
multislice (hybrid) mesh of mesh.dcn_*."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from jtrain import aot
from jtrain import config as config_lib
from jtrain import mesh as mesh_lib
from jtrain.experiment import Experiment
from jtrain.validation import ConfigError

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason=f"libtpu is not installed (pip install {aot.LIBTPU_PIN}; the test extra has it)",
)


def _clients():
    from jax._src import xla_bridge

    return list(xla_bridge.backends().values())


def tiny(**mesh):
    config = config_lib.load("configs/tiny.py")
    config.mesh.update(mesh)
    return config


@pytest.fixture(scope="module")
def report():
    return aot.compile_report(tiny(), "v5e:2x2")


@needs_libtpu
def test_a_tiny_model_compiles_for_v5e_2x2_with_xla_memory_and_flops(report):
    assert (report["chips"], report["device_kind"]) == (4, "TPU v5 lite")
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    memory = report["memory_per_device_bytes"]
    assert memory["arguments"] > 0 and memory["temporaries"] > 0
    # The state is donated: its outputs are written over its inputs.
    assert memory["aliased"] > 0.9 * memory["outputs"]
    peak = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    assert memory["total"] == peak
    save = report["save"]["memory_per_device_bytes"]
    assert save["arguments"] > 0 and save["total"] >= save["outputs"]
    # jtrain's count (MFU's) and the traced program's products are the same matmuls: the
    # projections, attention's two products over the whole sequence and the head, forward and
    # twice backward. Without remat nothing else multiplies matrices, so they agree exactly
    # (1% leaves room for float rounding only); the layers run in a scan, which XLA's own
    # cost analysis counts once, so its figure is lower.
    assert report["flops_per_step"] == pytest.approx(report["model_flops_per_step"], rel=0.01)
    assert report["flops_per_device"] * 4 == pytest.approx(report["flops_per_step"])
    assert report["xla_cost_flops_per_device"] < report["flops_per_device"]
    assert report["compile_s"] > 0


@needs_libtpu
def test_the_process_keeps_its_cpu_backend_after_compiling_for_tpu(report):
    # The compile ran in a child: libtpu never loaded here, and the CPU is the backend.
    assert not any(client.platform == "tpu" for client in _clients())
    assert jax.default_backend() == "cpu" and len(jax.devices()) == 8
    assert jnp.ones(2).sum().devices() == {jax.devices()[0]}


def test_rematerialised_layers_add_their_forward_products_to_the_count():
    def traced_flops(config):
        exp = Experiment.from_config(config)
        batch = aot.abstract_batch(config, exp.batch_sharding)
        return aot.matmul_flops(exp.train_step.trace(exp.abstract_sharded_state(), batch).jaxpr)

    config = tiny()
    plain = traced_flops(config)
    config.model.remat = "full"
    remat = traced_flops(config)
    # Each block's forward runs again in the backward pass: at most a third more than the
    # whole step (forward + backward = 3 forwards), less the head, which is not recomputed.
    assert plain < remat < plain * 4 / 3


def _two_slice_mesh(config) -> tuple[dict, list]:
    """(mesh shape, slice index of each device on the data x fsdp face), in a child process:
    libtpu loaded here would stay in the test process (see aot.in_child)."""
    mesh = mesh_lib.make_mesh(config.mesh, aot.topology_devices("v5e:2x2", slices=2))
    return dict(mesh.shape), [[d.slice_index for d in row] for row in mesh.devices[:, :, 0]]


def _mismatched_slices(config) -> str:
    try:
        mesh_lib.make_mesh(config.mesh, aot.topology_devices("v5e:2x2", slices=2))
    except ConfigError as err:
        return str(err)
    return ""


@needs_libtpu
def test_two_slices_build_a_hybrid_mesh_and_compile():
    config = tiny(data=1, fsdp=-1, dcn_data=2)
    shape, slices = aot.in_child(_two_slice_mesh, config)
    assert shape == {"data": 2, "fsdp": 4, "tensor": 1}
    # The data axis crosses the DCN; fsdp stays within a slice.
    assert slices == [[0] * 4, [1] * 4]
    report = aot.compile_report(config, "v5e:2x2")
    assert (report["slices"], report["chips"]) == (2, 8)
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert report["memory_per_device_bytes"]["total"] > 0


@needs_libtpu
def test_dcn_sizes_must_multiply_to_the_slices():
    message = aot.in_child(_mismatched_slices, tiny(data=-1, dcn_fsdp=4))
    assert "asks for 4 slices, but the devices form 2" in message


def test_dcn_on_devices_without_slices_names_the_keys():
    with pytest.raises(ConfigError, match="no slice index.*mesh.dcn_data, mesh.dcn_fsdp"):
        mesh_lib.make_mesh(tiny(dcn_data=2).mesh)
    with pytest.raises(ConfigError, match="positive integers"):
        mesh_lib.make_mesh(tiny(dcn_tensor=0).mesh)
    # Without slices the per-slice sizes are the whole mesh, as before.
    assert mesh_lib.mesh_shape(tiny(data=2, fsdp=-1).mesh, 8) == (2, 4, 1)


def test_without_libtpu_the_error_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        aot.importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a)
    )
    with pytest.raises(aot.AotUnavailable, match=r"needs libtpu.*pip install libtpu==0\.0\.52"):
        aot.compile_report(tiny(), "v5e:2x2")


def test_a_malformed_topology_is_refused_before_anything_loads():
    with pytest.raises(aot.TopologyError, match="v5p:4x4x8"):
        aot.topology_devices("v5e-8")


def test_a_step_too_big_for_the_chip_reports_xla_s_figures():
    message = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
        "memory required for HLO temporaries (248.34G) exceeds available HBM (95.73G)."
    )
    oom = aot._out_of_memory(message, argument_bytes=2**30)
    assert oom["fits"] is False and oom["hbm_bytes"] == int(95.73 * 2**30)
    assert oom["memory_per_device_bytes"]["total"] == 2**30 + int(248.34 * 2**30)
    assert aot._out_of_memory("INTERNAL: something else", argument_bytes=0) is None
