"""Runs every notebooks/*.ipynb top to bottom in a fresh kernel, from the repository's root:
a notebook is documentation, and one that no longer runs misleads whoever opens it.

A notebook holds the sizes a user would run in one cell tagged "parameters" (papermill's
convention); CI runs small ones by inserting, right after it, a cell tagged
"injected-parameters" that assigns this file's CI_PARAMETERS, as papermill would (without
depending on it). Every notebook must also open with its "Open in Colab" badge and install
jtrain in its first code cell, so that it runs on Colab as it runs here.
"""

import ast
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

BADGE = (
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    "(https://colab.research.google.com/github/YOUR-ORG/jtrain/blob/main/notebooks/{name})"
)
# What the install cell must do: install jtrain where it is missing, then work from the
# repository's root (the recipes in configs/ are read from there).
INSTALL_STEPS = ('importlib.util.find_spec("jtrain") is None', "%pip install", "os.chdir(")
PARAMETERS, INJECTED = "parameters", "injected-parameters"

# Each notebook's CI sizes: seconds on a 2-core CPU (tiny models, few steps).
CI_PARAMETERS = {
    "finetune_lora.ipynb": {"STEPS": 4, "BATCH_SIZE": 4, "SEQ_LEN": 64},
    "images_and_tables.ipynb": {
        "CHANNELS": 16,
        "STAGES": 2,
        "BLOCKS": 1,
        "EPOCHS": 5,
        "BATCH_SIZE": 32,
        "LR": 1e-2,  # a short run needs a higher rate
        "MIXUP_ALPHA": 0.0,  # mixup pays off over long runs, not in 5 epochs
    },
    "preference_and_rl.ipynb": {"QUICK": True, "PAIR_QUESTIONS": 64, "TEST_QUESTIONS": 16},
    "quickstart.ipynb": {"CONFIG": "configs/tiny.py", "STEPS": 6, "RESUME_STEPS": 3},
    "sharding.ipynb": {"CONFIG": "configs/tiny.py"},
}


def _tagged(notebook, tag: str) -> list[int]:
    return [i for i, c in enumerate(notebook.cells) if tag in c.metadata.get("tags", [])]


def _assigned_names(source: str) -> set[str]:
    """The names a cell assigns at its top level."""
    names = set()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def layout_problems(notebook, name: str) -> list[str]:
    """What the notebook lacks of the badge, the install cell and the parameters cell."""
    problems = []
    badge = BADGE.format(name=name)
    first = notebook.cells[0] if notebook.cells else None
    if first is None or first.cell_type != "markdown" or badge not in first.source:
        problems.append(f"its first cell lacks the Open in Colab badge {badge}")
    code = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code"]
    install = code[0] if code else None
    if install is None or not all(s in notebook.cells[install].source for s in INSTALL_STEPS):
        problems.append(f"its first code cell is not the install cell (doing {INSTALL_STEPS})")
    tagged = _tagged(notebook, PARAMETERS)
    if len(tagged) != 1 or notebook.cells[tagged[0]].cell_type != "code":
        problems.append(f"it needs one code cell tagged {PARAMETERS!r}; it has {len(tagged)}")
    elif install is not None and tagged[0] < install:
        problems.append("its parameters cell comes before the install cell")
    else:
        try:
            assigned = _assigned_names(notebook.cells[tagged[0]].source)
        except SyntaxError as err:
            assigned = set()
            problems.append(f"its parameters cell is not plain Python: {err}")
        missing = sorted(set(CI_PARAMETERS.get(name, {})) - assigned)
        if missing:
            problems.append(f"its parameters cell does not assign {missing}, which CI overrides")
    if any(c.get("outputs") or c.get("execution_count") for c in notebook.cells):
        problems.append("it holds outputs: clear them before committing")
    return problems


def with_ci_parameters(notebook, overrides: dict) -> None:
    """Inserts the CI overrides right after the parameters cell, as papermill does."""
    [index] = _tagged(notebook, PARAMETERS)
    lines = ["# Parameters (tests/test_notebooks.py: CI's sizes)"]
    lines += [f"{key} = {value!r}" for key, value in overrides.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": [INJECTED]})
    notebook.cells.insert(index + 1, cell)


def test_every_notebook_has_its_ci_parameters():
    names = {os.path.basename(p) for p in NOTEBOOKS}
    assert names == set(CI_PARAMETERS), "CI_PARAMETERS must name every notebook, and only those"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_has_badge_install_and_parameters(path):
    problems = layout_problems(nbformat.read(path, as_version=4), os.path.basename(path))
    assert not problems, f"{os.path.relpath(path, REPO)}: " + "; ".join(problems)


def test_layout_check_names_what_is_missing():
    notebook = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
    assert layout_problems(notebook, "quickstart.ipynb") == []
    notebook.cells[0].source = "# No badge"
    [index] = _tagged(notebook, PARAMETERS)
    notebook.cells[index].metadata["tags"] = []
    install = next(c for c in notebook.cells if c.cell_type == "code")
    install.source = install.source.replace("%pip install", "print")
    problems = layout_problems(notebook, "quickstart.ipynb")
    assert [p.split()[:4] for p in problems] == [
        ["its", "first", "cell", "lacks"],
        ["its", "first", "code", "cell"],
        ["it", "needs", "one", "code"],
    ]


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
    with_ci_parameters(notebook, CI_PARAMETERS[os.path.basename(path)])
    client = nbclient.NotebookClient(
        notebook,
        km=KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": REPO}},  # the working directory: configs/ loads
    )
    env = {
        **os.environ,  # conftest's: the compile cache the notebooks share
        "JAX_PLATFORMS": "cpu",
        # Not conftest's 8: the notebooks are single-device demos (sharding.ipynb asks for 8).
        "JAX_NUM_CPU_DEVICES": "1",
        "TMPDIR": str(tmp_path),  # what a notebook writes to tempfile goes with the test
    }
    try:
        client.execute(env=env)
    except (CellExecutionError, CellControlSignal, DeadKernelError) as err:
        # The message holds the failing cell's source and its error (or the timeout).
        where = os.path.relpath(path, REPO)
        pytest.fail(f"{where} failed: {_ANSI.sub('', str(err))}", pytrace=False)
