"""Exports a trained run as a Hugging Face model directory.

    python -m jtrain.export --workdir=runs/NAME --to_hf=exported/NAME [--step=N] [--dtype=bfloat16]

Reads the run's config.json and the parameters of its latest (or `--step`) checkpoint, and
writes config.json + safetensors (+ the tokenizer files when `data.tokenizer` is a Hugging
Face tokenizer) that `transformers.AutoModelForCausalLM.from_pretrained` loads. Parameters are
placed over all local devices (FSDP-style) while loading, so a model larger than one device
exports too; the writer then gathers them one tensor at a time.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
from absl import app, flags
from flax import nnx

from jtrain import checkpoint, tasks
from jtrain import mesh as mesh_lib
from jtrain.interop import hf

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


def trained_model(workdir: str, *, step: int | None = None) -> nnx.Module:
    """The model of a run with the parameters of its checkpoint at `step` (None = latest)."""
    config = run_config(workdir)
    task = tasks.get(config)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: task.make_model(nnx.Rngs(0))))
    # All local devices on one FSDP axis: parameters are spread over them, never replicated.
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    replicated = {name: "" for name in config.mesh.rules}
    try:
        rules = mesh_lib.parse_rules({**replicated, "embed": "fsdp"})
        shardings = mesh_lib.tree_shardings(abstract, mesh, rules)
    except ValueError:  # a width the device count does not divide: keep whole copies
        shardings = mesh_lib.tree_shardings(abstract, mesh, mesh_lib.parse_rules(replicated))
    sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    params = checkpoint.load_params(workdir, sharded, step=step)
    return nnx.merge(graphdef, params)


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
