"""Model families, registered by name under `model.kind`.

A family validates its own `model.*` keys and builds a model from them: a trunk with the head
a task asks for (`"logits"`: next-token logits; `"scores"`: a few outputs per position, for reward
models and classifiers). A new family is a module that calls `register`; the rest of jtrain
only ever calls `get(config.model.kind)`.
"""

from __future__ import annotations

from typing import Protocol

from flax import nnx

from jtrain.validation import ConfigError


class Family(Protocol):
    """What a model family supplies.

    `reads` says what its models take: "tokens" (token ids: the transformer) or "arrays" (a
    dict of feature arrays, `jtrain.models.inputs`: the mlp, cnn and vit families, which also
    have `forward_flops(model_config, inputs, outputs)`). A task names the one it needs.
    """

    reads: str

    def validate(self, config) -> None:
        """Raises ConfigError naming the first `model.*` value that cannot work."""
        ...

    def make(self, model_config, *, head: str, rngs: nnx.Rngs, **head_options) -> nnx.Module:
        """A freshly initialised model: the trunk and the named head."""
        ...


_FAMILIES: dict[str, Family] = {}


def register(kind: str):
    """Class decorator: registers an instance of the family class as `model.kind=kind`."""

    def add(cls):
        _FAMILIES[kind] = cls()
        return cls

    return add


def kinds() -> tuple[str, ...]:
    """The registered `model.kind` values."""
    _load_builtin()
    return tuple(sorted(_FAMILIES))


def family_of(model_config) -> Family:
    """The family of a `config.model` section (configs saved before `model.kind`: transformer)."""
    return get(model_config.get("kind", "transformer"))


def kinds_reading(reads: str) -> tuple[str, ...]:
    """The registered `model.kind` values whose models read `reads`."""
    return tuple(k for k in kinds() if _FAMILIES[k].reads == reads)


def get(kind: str) -> Family:
    """The family `model.kind` names; ConfigError lists the known ones."""
    _load_builtin()
    if kind not in _FAMILIES:
        raise ConfigError(f"config.model.kind={kind!r} is invalid: allowed: {', '.join(kinds())}.")
    return _FAMILIES[kind]


def _load_builtin() -> None:
    # Each import registers its family: "transformer", "mlp", "cnn", "vit".
    from jtrain.models import cnn, mlp, transformer, vit  # noqa: F401
