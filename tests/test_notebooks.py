"""Runs every notebooks/*.ipynb top to bottom in a fresh kernel, from the repository's root:
a notebook is documentation, and one that no longer runs misleads whoever opens it."""

import glob
import os
import re
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402 (nbclient's dependency)
from jupyter_client.manager import KernelManager  # noqa: E402
from nbclient.exceptions import CellControlSignal, CellExecutionError, DeadKernelError  # noqa: E402

from tests.conftest import REPO  # noqa: E402

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 300
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # tracebacks come colored


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """Only a python3 kernel of this interpreter, so the notebooks run where jtrain is installed
    whatever kernels the machine has (a user's python3 spec would otherwise come first)."""
    prefix = tmp_path_factory.mktemp("jupyter")
    kernelspec.install(prefix=str(prefix), kernel_name="python3")
    specs = KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])
    assert specs.get_kernel_spec("python3").argv[0] == sys.executable
    return specs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, kernel_specs, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        km=KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": REPO}},  # the working directory: configs/ loads
    )
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": "1",  # not conftest's 8: the notebooks are single-device demos
        "TMPDIR": str(tmp_path),  # what a notebook writes to tempfile goes with the test
    }
    try:
        client.execute(env=env)
    except (CellExecutionError, CellControlSignal, DeadKernelError) as err:
        # The message holds the failing cell's source and its error (or the timeout).
        where = os.path.relpath(path, REPO)
        pytest.fail(f"{where} failed: {_ANSI.sub('', str(err))}", pytrace=False)
