"""pyproject.toml's claims about the install hold for the installed dependencies: the Python it
requires is one every dependency accepts (and no lower one would be), and the accelerator
extras name extras that jax has.
"""

import importlib.metadata
import os
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.conftest import REPO

with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    PROJECT = tomllib.load(f)["project"]
DEPENDENCIES = [Requirement(r) for r in PROJECT["dependencies"]]


def _lowest_python(spec: SpecifierSet) -> tuple[int, int]:
    """The first 3.x release the specifier allows."""
    return next((3, minor) for minor in range(0, 40) if spec.contains(f"3.{minor}.0"))


def _requires_python(name: str) -> SpecifierSet:
    return SpecifierSet(importlib.metadata.metadata(name).get("Requires-Python") or "")


def test_every_dependency_accepts_the_lowest_python_the_project_allows():
    lowest = _lowest_python(SpecifierSet(PROJECT["requires-python"]))
    version = f"{lowest[0]}.{lowest[1]}.0"
    refusing = {
        r.name: str(_requires_python(r.name))
        for r in DEPENDENCIES
        if not _requires_python(r.name).contains(version)
    }
    assert not refusing, (
        f"requires-python allows {version}, which these installed dependencies refuse: "
        f"{refusing}; raise requires-python"
    )
    assert sys.version_info[:2] >= lowest


def test_no_lower_python_would_do():
    lowest = _lowest_python(SpecifierSet(PROJECT["requires-python"]))
    below = f"3.{lowest[1] - 1}.0"
    refusing = [r.name for r in DEPENDENCIES if not _requires_python(r.name).contains(below)]
    assert refusing, f"every installed dependency runs on {below}: lower requires-python"
    assert "jax" in refusing


def test_accelerator_extras_name_extras_jax_has():
    jax_extras = importlib.metadata.metadata("jax").get_all("Provides-Extra")
    for extra in ("tpu", "cuda12"):
        (requirement,) = map(Requirement, PROJECT["optional-dependencies"][extra])
        assert requirement.name == "jax" and requirement.extras == {extra}
        assert extra in jax_extras
