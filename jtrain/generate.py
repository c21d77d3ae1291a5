r"""Completes a JSON Lines file of prompts with a trained run or a Hugging Face model.

    python -m jtrain.generate --model=RUN_DIR|hf:PATH|hf:ORG/NAME[@REVISION] \
        --prompts=IN.jsonl --output=OUT.jsonl \
        [--max_new_tokens=N --temperature=T --top_k=K --top_p=P --seed=S --batch_size=B --step=N]

Each input line holds one of `{"prompt": text}` (encoded after BOS), `{"messages": [{"role":
..., "content": ...}, ...]}` (rendered with the chat template and its generation prompt) or
`{"prompt_ids": [ids]}`. Each output line repeats its input line's fields and adds
`completion` (the decoded text), `completion_ids` and `finish_reason` ("stop" or "length");
the stop token is in neither. Lines are generated in input order, --batch_size at a time by
`jtrain.sampler.Sampler`; a line that cannot be generated is reported as `PATH:LINE: reason`
on stderr and skipped. Batch k samples with a seed drawn from (--seed, k), so a sampled line's
completion depends on the batch it falls in, not only on --seed (greedy output, temperature 0,
uses no seed). The output is written to a temporary file beside it and renamed at the end, so it
appears whole or not at all, and an existing file is never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from absl import flags
from flax import nnx

from jtrain import checkpoint, cli, pretrained, runs
from jtrain.data import readers, tokenizers
from jtrain.interop import hub
from jtrain.models import int8
from jtrain.sampler import Completion, Sampler
from jtrain.tasks import chat

FIELDS = ("prompt", "messages", "prompt_ids")
QUANTIZE = ("none", "int8")  # --quantize: weights as trained, or int8 per channel


class LineError(ValueError):
    """An input line that cannot be generated: it is reported and skipped."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to sample: the generation flags."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = the whole vocabulary
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32

    def check(self) -> None:
        """Raises a ValueError naming the first setting out of range and what is allowed."""
        problems = [
            (self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 = no limit)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1] (1 = no limit)"),
            (self.batch_size >= 1, "batch_size", "must be at least 1"),
        ]
        for ok, name, allowed in problems:
            if not ok:
                raise ValueError(f"--{name}={getattr(self, name)} is invalid: it {allowed}")


@dataclasses.dataclass(frozen=True)
class Summary:
    """How many input lines were generated and how many skipped."""

    generated: int
    skipped: int


class Generator:
    """A model with its tokenizer and chat template: input lines in, completions out."""

    def __init__(self, model: nnx.Module, tokenizer, template: str, tokenizer_spec: str):
        self.model, self.tokenizer = model, tokenizer
        self.sampler = Sampler(model)
        self.vocab_size = int(model.cfg.vocab_size)
        # A template that cannot load spoils only the messages lines, not the plain prompts.
        self.template, self.template_error = None, ""
        try:
            self.template = chat.load(template, tokenizer_spec)
        except ValueError as err:
            self.template_error = str(err)
        stops = {int(tokenizer.eos_id)} | ({self.template.stop_id} if self.template else set())
        self.stop_ids = sorted(stops)

    def prompt_ids(self, value: dict, max_new_tokens: int) -> np.ndarray:
        """The ids to complete for one input line; LineError says why there are none."""
        present = [field for field in FIELDS if field in value]
        if len(present) != 1:
            found = f"has {' and '.join(present)}" if present else "has none"
            raise LineError(f"a line needs exactly one of {', '.join(FIELDS)}; this one {found}")
        encode = {"prompt": self._encode, "messages": self._render, "prompt_ids": self._checked}
        ids = encode[present[0]](value[present[0]])
        if ids.size == 0:
            raise LineError(f"{present[0]} is empty")
        max_len = self.sampler.max_len
        if max_len and ids.size + max_new_tokens > max_len:
            raise LineError(
                f"the prompt's {ids.size} tokens plus --max_new_tokens={max_new_tokens} exceed "
                f"the model's {max_len} positions; shorten it or lower --max_new_tokens"
            )
        return ids

    def _encode(self, prompt) -> np.ndarray:
        if not isinstance(prompt, str):
            raise LineError(f"prompt must be a string, not {_kind(prompt)}")
        if not prompt:
            raise LineError("prompt is empty")
        return self.tokenizer.encode(prompt, add_bos=True, add_eos=False)

    def _render(self, messages) -> np.ndarray:
        if not isinstance(messages, list):
            raise LineError(f"messages must be a list, not {_kind(messages)}")
        if not messages:
            raise LineError("messages is empty")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in chat.ROLES:
                raise LineError(f"messages[{i}] needs a role, one of {', '.join(chat.ROLES)}")
            if not isinstance(message.get("content"), str):
                raise LineError(f"messages[{i}].content must be a string")
        if self.template is None:
            raise LineError(f"the chat template cannot be loaded: {self.template_error}")
        try:
            pieces = self.template.prompt_pieces(messages)
        except chat.RenderError as err:
            raise LineError(str(err)) from None
        return chat.encode([pieces], self.tokenizer)[0][0]

    def _checked(self, ids) -> np.ndarray:
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise LineError("prompt_ids must be a list of integers")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            vocab = f"[0, {self.vocab_size})"
            raise LineError(f"prompt_ids holds {bad[0]}, outside the model's vocabulary {vocab}")
        return np.asarray(ids, np.int32)

    def complete(
        self, prompts: Sequence[np.ndarray], settings: Settings, *, seed: int
    ) -> list[Completion]:
        """One batch of completions; each stops at EOS or the template's end of turn."""
        return self.sampler.generate(
            [p.tolist() for p in prompts],
            max_new_tokens=settings.max_new_tokens,
            stop_ids=self.stop_ids,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=seed,
        )

    def output_line(self, value: dict, completion: Completion) -> dict:
        """The input line's fields plus its completion (without the stop token)."""
        ids = completion.tokens[: -1 if completion.finish_reason == "stop" else None]
        return {
            **value,
            "completion": self.tokenizer.decode(ids),
            "completion_ids": ids.tolist(),
            "finish_reason": completion.finish_reason,
        }


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _has_chat_template(directory: str) -> bool:
    """Whether a Hugging Face directory stores a chat template beside its tokenizer."""
    path = Path(directory)
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    has = isinstance(config, dict) and bool(config.get("chat_template"))
    return has or (path / "chat_template.jinja").is_file()


def load(spec: str, *, step: int | None = None, quantize: str = "none") -> Generator:
    """The model `spec` names (a jtrain run directory, hf:PATH, or a Hub model,
    hf:org/name[@revision], read through the Hub's cache) with its tokenizer and template, its
    weights in int8 with quantize="int8" (`jtrain.models.int8.quantize`).

    A run brings its own `data.tokenizer` and `data.chat_template` (a LoRA run comes merged);
    a Hugging Face directory its tokenizer files (byte ids when it has none, as a run started
    from it would use) and its own chat template when it stores one, else jtrain's builtin.
    """
    if pretrained.is_hf(spec):
        problem = pretrained.check(spec)
        if problem:
            raise ValueError(f"--model={spec}: {problem}")
        if step is not None:
            raise ValueError("--step picks a checkpoint of a jtrain run; hf: models have none")
        from jtrain.interop import hf

        path = pretrained.hf_path(spec)
        files = pretrained._TOKENIZER_FILES
        has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in files)
        tokenizer_spec = path if has_tokenizer else "byte"
        template = (
            chat.FROM_TOKENIZER if has_tokenizer and _has_chat_template(path) else chat.BUILTIN
        )
        vocab_size = hf.read_config(path)[1].vocab_size
        if not has_tokenizer and vocab_size < tokenizers.ByteTokenizer.vocab_size:
            raise ValueError(
                f"--model={spec}: the directory has no tokenizer ({' or '.join(files)}) and its "
                f"{vocab_size}-token vocabulary is too small for byte ids; add the model's "
                "tokenizer files to it"
            )
        model = hf.load_model(path)
    else:
        if not os.path.isdir(spec):
            hint = f" (for a Hub model: --model=hf:{spec})" if hub.parse(spec) else ""
            raise ValueError(
                f"--model={spec!r} is neither a directory nor hf:PATH; give a jtrain run "
                f"directory, or hf: and a Hugging Face model directory or Hub id{hint}"
            )
        config = runs.run_config(spec)
        tokenizer_spec, template = str(config.data.tokenizer), str(config.data.chat_template)
        model = runs.trained_model(spec, step=step)
    if not hasattr(model, "logits"):
        raise ValueError(
            f"--model={spec}: is a model with a {type(model).__name__} head (a reward model or a "
            "classifier), which scores text but cannot generate; give a language model"
        )
    if quantize not in QUANTIZE:
        raise ValueError(f"--quantize={quantize!r} is invalid: allowed: {', '.join(QUANTIZE)}")
    if quantize == "int8":
        int8.quantize(model)
    return Generator(model, tokenizers.get_tokenizer(tokenizer_spec), template, tokenizer_spec)


def check_paths(prompts: str, output: str) -> None:
    """Raises before any work if the input cannot be read or the output cannot be written."""
    if not os.path.isfile(prompts):
        raise FileNotFoundError(f"--prompts={prompts}: no such file")
    if readers.detect_format(prompts) != "jsonl":
        raise ValueError(
            f"--prompts={prompts}: name a JSON Lines file ({', '.join(readers.JSONL_SUFFIXES)}, "
            "optionally .gz or .zst)"
        )
    if os.path.exists(output):
        raise FileExistsError(f"--output={output} exists; remove it or choose another name")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise FileNotFoundError(f"--output={output}: its directory does not exist; create it")


def batch_seed(seed: int, batch: int) -> int:
    """Batch `batch`'s sampling seed: distinct per batch, so repeated lines differ."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def generate_file(
    generator: Generator,
    prompts: str,
    output: str,
    settings: Settings,
    *,
    report: Callable[[str], None] | None = None,
) -> Summary:
    """Writes `output`: every good line of `prompts` with its completion, in input order.

    Bad lines go to `report` (default: stderr) as `PATH:LINE: reason`. Raises a ValueError
    when no line could be generated, and then writes nothing.
    """
    settings.check()
    check_paths(prompts, output)
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    name = os.path.basename(output)
    fd, temporary = tempfile.mkstemp(
        prefix=f".{name}.", suffix=".tmp", dir=os.path.dirname(os.path.abspath(output))
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            summary = _write_completions(generator, prompts, out, settings, report)
        if not summary.generated:
            raise ValueError(
                f"no line of {prompts} could be generated ({summary.skipped} skipped; see the "
                "reasons above)"
            )
        if os.path.exists(output):
            raise FileExistsError(f"--output={output} appeared while generating; nothing written")
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return summary


def _write_completions(generator, prompts, out, settings, report) -> Summary:
    generated = skipped = batches = 0
    pending: list[tuple[dict, np.ndarray]] = []

    def flush() -> None:
        nonlocal generated, batches
        seed = batch_seed(settings.seed, batches)
        completions = generator.complete([ids for _, ids in pending], settings, seed=seed)
        for (value, _), completion in zip(pending, completions, strict=True):
            line = generator.output_line(value, completion)
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
        generated, batches = generated + len(pending), batches + 1
        pending.clear()

    for row in readers.iter_file_rows(prompts):
        try:
            if row.error is not None:
                raise LineError(row.reason)
            pending.append((row.value, generator.prompt_ids(row.value, settings.max_new_tokens)))
        except LineError as err:
            report(f"{row.source}: {err}")
            skipped += 1
            continue
        if len(pending) == settings.batch_size:
            flush()
    if pending:
        flush()
    return Summary(generated, skipped)


def define_model_flags() -> None:
    """--model, --step and --quantize: how jtrain.generate and jtrain.serve name a model."""
    flags.DEFINE_string(
        "model", None, "A jtrain run directory, hf:PATH or a Hub model, hf:org/name[@revision]."
    )
    flags.DEFINE_integer("step", None, "The run's checkpoint step (default: the latest).")
    flags.DEFINE_enum("quantize", "none", QUANTIZE, "Weights in int8 (per channel).")


def _define_flags() -> None:
    """Defines the CLI flags; only when run as a program, so importing never claims names."""
    define_model_flags()
    flags.DEFINE_string("prompts", None, "JSON Lines of prompt, messages or prompt_ids.")
    flags.DEFINE_string("output", None, "A new JSON Lines file to write.")
    flags.DEFINE_integer("max_new_tokens", Settings.max_new_tokens, "Tokens per line.")
    flags.DEFINE_float("temperature", Settings.temperature, "0 = greedy.")
    flags.DEFINE_integer("top_k", Settings.top_k, "Sample from the k likeliest (0 = all).")
    flags.DEFINE_float("top_p", Settings.top_p, "Sample from this probability mass.")
    flags.DEFINE_integer("seed", Settings.seed, "Seeds the sampling of every batch.")
    flags.DEFINE_integer("batch_size", Settings.batch_size, "Lines generated together.")


def main(argv: list[str]) -> None:
    cli.start(argv)
    f = flags.FLAGS
    settings = Settings(
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        top_k=f.top_k,
        top_p=f.top_p,
        seed=f.seed,
        batch_size=f.batch_size,
    )
    try:
        settings.check()
        check_paths(f.prompts, f.output)  # before the model loads: fail in a second
        generator = load(f.model, step=f.step, quantize=f.quantize)
        summary = generate_file(generator, f.prompts, f.output, settings)
    except (checkpoint.CheckpointError, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"jtrain: generated {summary.generated} lines to {f.output} ({summary.skipped} skipped)")


def command() -> None:
    """The `jtrain-generate` command (python -m jtrain.generate)."""
    _define_flags()
    flags.mark_flags_as_required(["model", "prompts", "output"])
    cli.run(main)


if __name__ == "__main__":
    command()
