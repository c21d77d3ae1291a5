"""Pre-trained weights for `model.init_from`: a jtrain run or a Hugging Face model.

`load(spec, abstract_params)` reads parameters only (never optimizer or data state) straight
into the shardings that `abstract_params` carries. `spec` is a jtrain workdir or
`checkpoints/` directory, or `hf:` and a Hugging Face model (config.json + safetensors): a local
directory (`hf:PATH`), or a Hub id (`hf:org/name[@revision]`) resolved through the Hub's cache
(`jtrain.interop.hub`). An existing local directory wins over a Hub id of the same name.
Passing a subtree of the model's parameters loads just those (a LoRA run loads its frozen base
this way; the adapters start fresh).
"""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx

from jtrain.errors import DataError
from jtrain.interop import hub

HF_PREFIX = "hf:"


def is_hf(spec: str) -> bool:
    """True for `hf:` specs (a local directory or a Hub id)."""
    return spec.startswith(HF_PREFIX)


def hub_id(spec: str) -> tuple[str, str] | None:
    """(repo id, revision) of an hf: spec naming a Hub model: `org/name[@revision]` that is not
    an existing local directory; None for a local directory (reads nothing but the path)."""
    target = spec[len(HF_PREFIX) :]
    return None if os.path.isdir(os.path.expanduser(target)) else hub.parse(target)


def hub_snapshot(spec: str) -> hub.Snapshot | None:
    """The Hub cache's snapshot an hf: spec resolves to (fetched once per process where it is
    missing), or None for a local directory; a HubError says how to get a missing model."""
    repo = hub_id(spec)
    return None if repo is None else hub.snapshot(*repo)


def hf_path(spec: str) -> str:
    """The local directory an hf: spec names: the directory itself, or its Hub snapshot."""
    snapshot = hub_snapshot(spec)
    return os.path.expanduser(spec[len(HF_PREFIX) :]) if snapshot is None else snapshot.path


def check(spec: str) -> str | None:
    """What is wrong with an init_from spec, or None if it can work (no weights are read; a Hub
    model the cache lacks is downloaded, once per process)."""
    if not spec:
        return None
    if is_hf(spec):
        try:
            path = hf_path(spec)
        except hub.HubError as err:
            return str(err)
        if not os.path.isfile(os.path.join(path, "config.json")):
            return f"{path!r} is not a Hugging Face model directory (no config.json)"
        from jtrain.interop import safetensors_io

        try:
            safetensors_io.weight_files(path)
        except DataError as err:
            return str(err).rstrip(".")
        return None
    if not os.path.isdir(spec):
        hint = f" (for a Hub model: hf:{spec})" if hub.parse(spec) else ""
        return (
            "no such directory; give a jtrain workdir, its checkpoints/ directory, hf:PATH or "
            f"hf:org/name[@revision]{hint}"
        )
    return None


# TransformerConfig fields that are choices of the run, not part of a checkpoint's architecture.
_RUN_FIELDS = ("dtype", "remat", "attention", "loss_chunk", "dropout")


# Files whose presence makes a Hugging Face directory a tokenizer jtrain can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def apply_architecture(config) -> list[str]:
    """Sets `config.model`'s architecture keys from an hf: init_from's config.json, and
    `data.tokenizer` to that directory (a Hub model: `hf:org/name@COMMIT`) when it is "byte"
    and the directory has one.

    Returns `KEY: old -> new` for every key that changed (nothing for other specs).
    Raises ValueError for a directory whose architecture jtrain cannot express.
    """
    spec = config.model.init_from
    if not is_hf(spec):
        return []
    try:
        path = hf_path(spec)
    except hub.HubError:
        return []  # validation reports it
    if not os.path.isfile(os.path.join(path, "config.json")):
        return []  # validation reports a missing directory
    from jtrain.interop import hf_config

    _, architecture = hf_config.config_from_hf(hf_config.read_config_json(path))
    changes = []
    for field in dataclasses.fields(architecture):
        name, value = field.name, getattr(architecture, field.name)
        if name in _RUN_FIELDS or config.model[name] == value:
            continue
        changes.append(f"model.{name}: {config.model[name]!r} -> {value!r}")
        config.model[name] = value
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)
    if config.data.tokenizer == "byte" and has_tokenizer:
        # Byte ids fed to a model trained on another vocabulary would train silently on noise.
        # A Hub model's tokenizer is named by its commit, not by the cache's path: the same
        # on every machine, so a resume elsewhere is not refused for a changed data.tokenizer.
        snapshot = hub_snapshot(spec)
        tokenizer = path if snapshot is None else f"{HF_PREFIX}{snapshot.repo_id}@{snapshot.commit}"
        changes.append(f"data.tokenizer: 'byte' -> {tokenizer!r}")
        config.data.tokenizer = tokenizer
    return changes


def load(spec: str, abstract_params: nnx.State, *, step: int | None = None) -> nnx.State:
    """Parameters from `spec`, shaped, typed and placed like `abstract_params`.

    `abstract_params` leaves are `jax.ShapeDtypeStruct`s with a `sharding`. `step` picks a
    jtrain run's checkpoint (None = its newest).
    """
    if is_hf(spec):
        from jtrain.interop import hf  # torch-free, but only needed for hf: specs

        shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
        return hf.load_params(hf_path(spec), abstract_params, shardings)
    from jtrain import checkpoint

    return checkpoint.load_params(spec, abstract_params, step=step)
