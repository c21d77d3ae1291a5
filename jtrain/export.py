"""Exports a trained run as a Hugging Face model directory.

    python -m jtrain.export --workdir=runs/NAME --to_hf=exported/NAME [--step=N] [--dtype=bfloat16]

Reads the run's config.json and the parameters of its latest (or `--step`) checkpoint, and
writes config.json + safetensors (+ the tokenizer files when `data.tokenizer` is a Hugging
Face tokenizer) that `transformers.AutoModelForCausalLM.from_pretrained` loads. A LoRA run is
exported merged: its adapters folded into the base weights. The weights are assembled in host
memory, whatever devices and mesh the run used.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from flax import nnx

from jtrain import checkpoint
from jtrain.experiment import Experiment
from jtrain.interop import hf
from jtrain.models import lora
from jtrain.state import BASE

_WORKDIR = flags.DEFINE_string("workdir", None, "The jtrain run to export.")
_TO_HF = flags.DEFINE_string("to_hf", None, "A new (or empty) directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored tensor dtype.")
_FAMILY = flags.DEFINE_enum(
    "family", None, list(hf.ARCHITECTURES), "Architecture to write (default: inferred)."
)


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in workdir/config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise checkpoint.CheckpointError(f"{workdir} is not a jtrain workdir: {path} is missing")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _tokenizer_dir(config) -> str | None:
    """The directory holding the run's Hugging Face tokenizer files, if it has any."""
    spec = os.path.expanduser(str(config.data.tokenizer))
    if os.path.isdir(spec):
        return spec
    if os.path.isfile(spec):
        return os.path.dirname(os.path.abspath(spec))
    return None


def _host_devices() -> list[jax.Device]:
    """One device in host memory (the writer gathers every tensor to the host anyway)."""
    try:
        return jax.devices("cpu")[:1]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return jax.local_devices()[:1]


def trained_model(workdir: str, *, step: int | None = None) -> nnx.Module:
    """The run's model with the weights of its checkpoint at `step` (None = the latest).

    A LoRA run's checkpoint holds its adapters only: the frozen base is rebuilt as the run
    built it (from model.init_from, or from the seed), and the adapters are merged into it.
    """
    config = run_config(workdir)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    exp = Experiment.from_config(config, _host_devices())
    params = checkpoint.load_params(workdir, exp.abstract_sharded_state().params, step=step)
    if not exp.has_frozen_base():
        return nnx.merge(exp.graphdef, params)
    return lora.merge(nnx.merge(exp.graphdef, params, exp.rebuild_frozen()[BASE]))


def export_hf(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    dtype: str = "float32",
    family: str | None = None,
) -> str:
    """Writes the run's model to `out` as a Hugging Face directory; returns its family."""
    config = run_config(workdir)
    model = trained_model(workdir, step=step)
    family = family or hf.infer_family(model.cfg)
    max_len = model.cfg.max_seq_len or int(config.train.seq_len)
    tokenizer_dir = _tokenizer_dir(config)
    hf.save_model(
        model,
        out,
        family=family,
        dtype=dtype,
        max_position_embeddings=max_len,
        tokenizer_dir=tokenizer_dir,
    )
    if tokenizer_dir is None:
        print(
            f"note: data.tokenizer={config.data.tokenizer!r} has no Hugging Face tokenizer file; "
            "only the weights were written (byte ids: 0-255 bytes, PAD=256, BOS=257, EOS=258)."
        )
    return family


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO
    try:
        family = export_hf(
            _WORKDIR.value, _TO_HF.value, step=_STEP.value, dtype=_DTYPE.value, family=_FAMILY.value
        )
    except (checkpoint.CheckpointError, ValueError, FileExistsError) as err:
        sys.exit(f"error: {err}")
    print(f"jtrain: exported {_WORKDIR.value} as a {family} model to {_TO_HF.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "to_hf"])
    app.run(main)
