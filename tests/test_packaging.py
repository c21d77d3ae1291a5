"""The package a `pip install` user gets: the wheel built from this checkout holds the recipes,
the license, the console commands and the extras; `--config` takes a recipe's name; the
installed `jtrain-train` script starts; and the commands import, and read JSONL, without the
`prepare` extra (pyarrow, zstandard), whose absence is one line naming the extra."""

import configparser
import email.parser
import glob
import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
from absl import flags

import jtrain
from jtrain import config as config_lib
from jtrain import recipes
from jtrain.validation import ConfigError
from tests.conftest import REPO

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
# The files a user may name: supervised.py is the base of others, not a recipe.
RECIPES = [
    os.path.basename(p)[:-3]
    for p in CONFIG_FILES
    if "def get_config(" in pathlib.Path(p).read_text()
]
EXTRAS = {"prepare", "plot", "wandb", "tpu", "cuda12", "test"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """The wheel of this checkout, built from a copy (the build leaves build/ behind)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(REPO, name), source)
    for name in ("jtrain", "configs"):
        shutil.copytree(
            os.path.join(REPO, name), source / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps"]
    command += ["--no-build-isolation", "--no-index", "-q", "-w", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    (path,) = glob.glob(str(out / "jtrain-*.whl"))
    return path


def _dist_info(wheel: str, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        (member,) = [
            n
            for n in z.namelist()
            if n.split("/")[0].endswith(".dist-info") and n.split("/", 1)[1] == name
        ]
        return z.read(member).decode()


def _console_scripts(wheel: str) -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read_string(_dist_info(wheel, "entry_points.txt"))
    return dict(parser["console_scripts"])


def test_the_wheel_holds_the_recipes_the_license_and_every_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {f"jtrain/configs/{os.path.basename(p)}" for p in CONFIG_FILES} <= names
    packages = {os.path.dirname(p) for p in names if p.endswith("/__init__.py")}
    in_checkout = {
        os.path.relpath(os.path.dirname(p), REPO)
        for p in glob.glob(os.path.join(REPO, "jtrain", "**", "__init__.py"), recursive=True)
    }
    # pyproject.toml lists the packages: one added to jtrain/ must be added there too.
    assert in_checkout | {"jtrain/configs"} == packages
    assert not any(n.startswith(("configs/", "tests/")) for n in names)
    with open(os.path.join(REPO, "LICENSE")) as f:
        assert _dist_info(wheel, "licenses/LICENSE") == f.read()


def test_the_wheel_declares_the_commands_and_keeps_the_base_install_lean(wheel):
    scripts = _console_scripts(wheel)
    for command in ("train", "prepare", "export", "generate", "serve", "predict", "plot"):
        assert f"jtrain-{command}" in scripts
    assert scripts["jtrain-train"] == "jtrain.main:command"
    metadata = email.parser.Parser().parsestr(_dist_info(wheel, "METADATA"))
    assert set(metadata.get_all("Provides-Extra")) == EXTRAS
    assert metadata["License-Expression"] == "Apache-2.0"
    requires = metadata.get_all("Requires-Dist")
    base = {r.split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert "jax" in base and not base & {"pyarrow", "zstandard", "matplotlib", "wandb"}
    assert 'pyarrow>=14; extra == "prepare"' in requires
    assert 'jtrain[plot,prepare]; extra == "test"' in requires


@pytest.fixture
def absl_flags_restored():
    """Removes the flags the test defines (importing jtrain.main defines required ones, which
    would fail every later command parsed in this process) and forgets jtrain.main."""
    before, parsed = set(flags.FLAGS), flags.FLAGS.is_parsed()
    yield
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
    if not parsed:
        flags.FLAGS.unparse_flags()
    sys.modules.pop("jtrain.main", None)
    vars(jtrain).pop("main", None)


def test_every_console_command_target_is_callable(wheel, absl_flags_restored):
    for name, target in _console_scripts(wheel).items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_a_recipe_loads_by_its_name():
    assert recipes.names() == RECIPES and "default" in RECIPES and "supervised" not in RECIPES
    assert config_lib.load("default").to_dict() == config_lib.load("configs/default.py").to_dict()
    assert config_lib.load("lora").model.lora.rank > 0
    with pytest.raises(ConfigError) as err:
        config_lib.load("defualt")
    assert "'defualt': no such config file or recipe" in str(err.value)
    assert "default, digits_cnn" in str(err.value)


def test_the_config_flag_takes_a_recipe_name(absl_flags_restored, tmp_path, capsys, monkeypatch):
    from jtrain import cli, main

    def parse(*args: str) -> list[str]:
        # As app.run does; ml_collections also reads the --config.KEY overrides in sys.argv.
        monkeypatch.setattr(sys, "argv", ["jtrain-train", *args, f"--workdir={tmp_path}"])
        return cli.parse_flags(sys.argv)

    assert parse("--config=tiny") == ["jtrain-train"]
    assert main._CONFIG.value.to_dict() == config_lib.load("configs/tiny.py").to_dict()
    parse("--config", "tiny", "--config.train.steps=7")
    assert main._CONFIG.value.train.steps == 7
    with pytest.raises(SystemExit):
        parse("--config=nosuch")
    error = capsys.readouterr().err
    assert error.startswith("error: --config=nosuch: no such config file or recipe")
    assert "default, digits_cnn" in error


def test_the_installed_script_starts_and_finds_the_recipes(wheel, tmp_path):
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q"]
    subprocess.run([*install, "--target", str(site), wheel], check=True, timeout=120)
    # PYTHONPATH puts the installed copy first; cwd is not the checkout.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import jtrain.recipes as r; print(r.resolve('default'))"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert where.stdout.strip() == str(site / "jtrain" / "configs" / "default.py")
    started = subprocess.run(
        [str(site / "bin" / "jtrain-train"), "--config=tiny", "--helpshort"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "--workdir: Directory for config" in started.stdout, started.stderr


BLOCKED = textwrap.dedent(
    """
    import gzip, json, sys
    sys.modules.update(pyarrow=None, zstandard=None)  # as if not installed
    import jtrain.main, jtrain.predict, jtrain.serve, jtrain.data.prepare
    from jtrain import extras
    from jtrain.data import readers, table_files
    from jtrain.data.records import Skipped

    with gzip.open("a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "hello"}) + "\\n")
    assert [r.value for r in readers.iter_file_rows("a.jsonl.gz")] == [{"text": "hello"}]
    open("t.csv", "w").write("x,y\\n1,2\\n")
    for read in (
        lambda: list(readers.iter_file_rows("a.parquet")),
        lambda: list(readers.iter_file_rows("a.jsonl.zst")),
        lambda: table_files.read("csv", ["t.csv"], Skipped()),
    ):
        try:
            read()
        except extras.MissingExtraError as err:
            print(err)
    """
)


def test_the_base_install_reads_without_the_prepare_extra(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    install = 'which the base install leaves out: pip install "jtrain[prepare]"'
    assert result.stdout.splitlines() == [
        f"reading Parquet files needs pyarrow, {install}",
        f"reading .zst files needs zstandard, {install}",
        f"reading CSV tables needs pyarrow, {install}",
    ]
