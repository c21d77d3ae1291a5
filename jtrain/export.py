"""Exports a trained run as a Hugging Face model directory.

    python -m jtrain.export --workdir=runs/NAME --to_hf=exported/NAME [--step=N] [--dtype=bfloat16]

Reads the run's config.json and the parameters of its newest readable checkpoint (a damaged
one is passed over with a warning) or of `--step`, and writes config.json + safetensors (+ the
tokenizer files when `data.tokenizer` is a Hugging Face tokenizer) that
`transformers.AutoModelForCausalLM.from_pretrained` loads; a reward run
(`task="reward"`) is written as the family's `...ForSequenceClassification` with one label,
for `AutoModelForSequenceClassification`. A LoRA run is exported merged: its adapters folded
into the base weights. The weights are assembled in host memory, whatever devices and mesh the
run used.

config.json gets the tokenizer's BOS, EOS and PAD ids. A reward model needs a PAD distinct from
EOS: transformers reads a sequence's score at its last token that is not PAD, so with PAD ==
EOS (a tokenizer without a PAD token) it reads every sequence ending in EOS one token early,
where jtrain reads the EOS. The export warns then; give the tokenizer a PAD token and set
config.json's pad_token_id to it (see `jtrain.interop.hf`).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from jtrain import cli, errors
from jtrain.data import tokenizers
from jtrain.interop import hf
from jtrain.runs import run_config, trained_model


def _define_flags() -> None:
    """Defines the CLI flags; only when run as a program, so importing never claims names."""
    flags.DEFINE_string("workdir", None, "The jtrain run to export.")
    flags.DEFINE_string("to_hf", None, "A new (or empty) directory to write.")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored tensor dtype.")
    flags.DEFINE_enum(
        "family", None, list(hf.ARCHITECTURES), "Architecture to write (default: inferred)."
    )


def _tokenizer_dir(config) -> str | None:
    """The directory holding the run's Hugging Face tokenizer files, if it has any."""
    spec = tokenizers.local_path(config.data.tokenizer)
    if os.path.isdir(spec):
        return spec
    if os.path.isfile(spec):
        return os.path.dirname(os.path.abspath(spec))
    return None


def _tokenizer_ids(config) -> dict[str, int]:
    """The run's BOS, EOS and PAD ids, for config.json (none when its tokenizer cannot be read)."""
    try:
        tokenizer = tokenizers.get_tokenizer(str(config.data.tokenizer))
    except ValueError:
        return {}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return {**ids, "pad_token_id": tokenizer.pad_id}


def export_hf(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    dtype: str = "float32",
    family: str | None = None,
) -> str:
    """Writes the run's model (a causal LM, or a reward model's sequence classifier) to `out`
    as a Hugging Face directory; returns its family."""
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
        **_tokenizer_ids(config),
    )
    if tokenizer_dir is None:
        print(
            f"note: data.tokenizer={config.data.tokenizer!r} has no Hugging Face tokenizer file; "
            "only the weights were written (byte ids: 0-255 bytes, PAD=256, BOS=257, EOS=258)."
        )
    return family


def main(argv: list[str]) -> None:
    cli.start(argv)
    f = flags.FLAGS
    with errors.reported():
        try:
            family = export_hf(f.workdir, f.to_hf, step=f.step, dtype=f.dtype, family=f.family)
        except (ValueError, FileExistsError) as err:  # an architecture or --to_hf refused
            sys.exit(f"error: {err}")
    print(f"jtrain: exported {f.workdir} as a {family} model to {f.to_hf}")


def command() -> None:
    """The `jtrain-export` command (python -m jtrain.export)."""
    _define_flags()
    flags.mark_flags_as_required(["workdir", "to_hf"])
    cli.run(main)


if __name__ == "__main__":
    command()
