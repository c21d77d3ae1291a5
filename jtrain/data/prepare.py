"""Offline data preparation: raw text files to tokenized ArrayRecord splits plus a manifest.

    python -m jtrain.data.prepare --input='DIR/*.jsonl' --output=OUT --text_field=text \\
        --splits=0.8,0.1,0.1 [--tokenizer=byte|PATH/tokenizer.json|PATH/x.model] [--near_dedup]

One streaming pass: read (readers.py) -> clean (cleaning.py) -> drop exact, then near
duplicates (dedup.py) -> split by a hash of the cleaned content (sources.split_of) ->
tokenize in batches -> append to the split's current shard. Deduplication runs before the
split, so a document never lands in two splits, and the split of a document depends on its
content alone, never on the input order. Bad records are counted, with up to 5
"file:line: reason" examples per kind, and skipped (or fatal with --strict).

Output layout (read by the training pipeline):
    OUT/{train,val,test}/shard-{i:05d}-of-{n:05d}.array_record   one document per record:
        its token ids, BOS first and EOS last, as little-endian int32 bytes
    OUT/content_hashes/{split}.txt   the split's sorted content hashes (contamination checks)
    OUT/manifest.json                counts, per-split documents/tokens/fingerprint, config
Everything is written under OUT.tmp-<pid> and renamed to OUT at the end, so an OUT that
exists is complete; an interrupted run leaves only the .tmp directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence

from absl import app, flags

from jtrain import cli, errors
from jtrain.data import cleaning, dedup, prepared_output, readers, sources, tokenizers

BAD_KINDS = ("malformed", "invalid_utf8", "missing_field", "non_string", "empty")
COUNT_KINDS = ("read", *BAD_KINDS, "duplicates", "near_duplicates", "kept")
FORMAT = {
    "record": "int32-le token ids, one document per record, BOS..EOS",
    "version": 1,
    "fingerprint": "sha256 over the split's sorted content hashes, each 64 hex digits + '\\n'",
    "content_hash": "sha256 hex of the cleaned document's UTF-8 bytes",
}
_MAX_EXAMPLES = 5
_BATCH = 256  # documents per near-dedup and tokenizer call: amortises per-call overhead
_PENDING, _NEAR_DUPLICATE = -2, -1
_PROGRESS_EVERY_S = 0.5


class BadRecordError(ValueError):
    """A bad input record under `strict`; the message starts with its file:line."""


def parse_splits(values: Sequence[float | str]) -> tuple[float, float, float]:
    """Returns the train/val/test fractions, checked: 3 non-negative numbers summing to 1."""
    try:
        fractions = tuple(float(v) for v in values)
    except ValueError:
        fractions = ()
    if (
        len(fractions) != len(sources.SPLITS)
        or not all(math.isfinite(f) and f >= 0 for f in fractions)
        or abs(sum(fractions) - 1) > 1e-6
    ):
        raise ValueError(
            f"--splits must be 3 non-negative numbers for {'/'.join(sources.SPLITS)} summing "
            f"to 1, e.g. --splits=0.8,0.1,0.1; got {','.join(map(str, values))!r}."
        )
    total = sum(fractions)
    return tuple(f / total for f in fractions)  # exactly 1 for split_of's check


class _Progress:
    """A single `\\r` line on stderr: documents read and kept, documents/s, MB/s."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = self._last = time.monotonic()

    def rate(self, read: int, nbytes: int) -> tuple[float, float, float]:
        seconds = max(time.monotonic() - self.start, 1e-9)
        return seconds, read / seconds, nbytes / 1e6 / seconds

    def update(self, read: int, kept: int, nbytes: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not final and now - self._last < _PROGRESS_EVERY_S:
            return
        self._last = now
        _, docs_per_s, mb_per_s = self.rate(read, nbytes)
        line = (
            f"\rprepare: {read:,} read, {kept:,} kept, {docs_per_s:,.0f} docs/s, "
            f"{mb_per_s:.1f} MB/s"
        )
        print(line, end="\n" if final else "", file=sys.stderr, flush=True)


class _Preparer:
    """The state of one preparation pass: counters, dedup sets, split writers."""

    def __init__(self, root: str, tok, fractions, near_dedup, threshold, shard_docs, strict):
        self.tok, self.fractions, self.strict = tok, fractions, strict
        self.counts = dict.fromkeys(COUNT_KINDS, 0)
        self.examples: dict[str, list[str]] = {}
        self.input_bytes = 0
        # Exact dedup: every content digest seen -> its split index, or _NEAR_DUPLICATE, or
        # _PENDING while queued. Memory is O(documents), ~150 bytes each: fine to ~10^8 docs.
        self.seen: dict[bytes, int] = {}
        self.lsh = dedup.MinHashLSH(threshold=threshold) if near_dedup else None
        self.writers = [
            prepared_output.SplitWriter(os.path.join(root, split), shard_docs)
            for split in sources.SPLITS
        ]
        self._queue: list[tuple[str, str, bytes]] = []  # (source, cleaned text, digest)

    def _skip(self, kind: str, source: str, reason: str) -> None:
        self.counts[kind] += 1
        if kind in BAD_KINDS and self.strict:
            raise BadRecordError(
                f"{source}: {kind}: {reason} (--strict stops at the first bad record; "
                "without it bad records are skipped and counted)."
            )
        examples = self.examples.setdefault(kind, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(f"{source}: {reason}")

    def add(self, record: readers.Record) -> None:
        """Counts `record` and, if it is a new good document, queues it for near-dedup."""
        self.counts["read"] += 1
        self.input_bytes += record.nbytes
        if record.error is not None:
            self._skip(record.error, record.source, record.reason)
            return
        text = cleaning.clean(record.text)
        if not text:
            self._skip("empty", record.source, "empty after cleaning")
            return
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in self.seen:
            self._skip("duplicates", record.source, "exact duplicate of an earlier document")
            return
        self.seen[digest] = _PENDING
        self._queue.append((record.source, text, digest))
        if len(self._queue) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        """Near-dedups the queued documents, then tokenizes each kept one into its split."""
        if not self._queue:
            return
        if self.lsh is None:
            matches = [None] * len(self._queue)
        else:
            sources_, texts = [q[0] for q in self._queue], [q[1] for q in self._queue]
            matches = self.lsh.add_batch(sources_, texts)
        kept: list[tuple[int, str]] = []
        for (source, text, digest), match in zip(self._queue, matches, strict=True):
            if match is not None:
                self.seen[digest] = _NEAR_DUPLICATE
                reason = f"near duplicate of {match[0]} (estimated Jaccard {match[1]:.2f})"
                self._skip("near_duplicates", source, reason)
                continue
            split = sources.SPLITS.index(sources.split_of(digest.hex(), self.fractions))
            self.seen[digest] = split
            kept.append((split, text))
        self._queue.clear()
        self.counts["kept"] += len(kept)
        self._write([text for _, text in kept], [split for split, _ in kept])

    def _write(self, texts: list[str], splits: list[int]) -> None:
        batch = self.tok.encode_batch(texts, add_bos=True, add_eos=True)
        for split, ids in zip(splits, batch, strict=True):
            self.writers[split].write(ids)

    def finish(self, root: str) -> dict:
        """Closes the shards, writes the content-hash lists; returns the manifest's splits."""
        self.flush()
        by_split: list[list[bytes]] = [[] for _ in sources.SPLITS]
        for digest, split in self.seen.items():
            if split >= 0:
                by_split[split].append(digest)
        os.makedirs(os.path.join(root, "content_hashes"))
        splits = {}
        for name, writer, digests in zip(sources.SPLITS, self.writers, by_split, strict=True):
            digests.sort()
            fingerprint = hashlib.sha256()
            with open(os.path.join(root, "content_hashes", f"{name}.txt"), "wb") as f:
                for start in range(0, len(digests), 65536):
                    chunk = digests[start : start + 65536]
                    lines = "".join(d.hex() + "\n" for d in chunk).encode("ascii")
                    fingerprint.update(lines)
                    f.write(lines)
            splits[name] = {
                "documents": writer.documents,
                "tokens": writer.tokens,
                "shards": writer.close(),
                "fingerprint": fingerprint.hexdigest(),
            }
        return splits


def _check_options(text_mode, fmt, shard_docs, near_dedup_threshold, text_field) -> None:
    readers.check_options(text_mode, fmt)
    if isinstance(shard_docs, bool) or not isinstance(shard_docs, int) or shard_docs < 1:
        raise ValueError(f"--shard_docs must be an integer >= 1, got {shard_docs!r}.")
    if not 0 < near_dedup_threshold <= 1:
        raise ValueError(f"--near_dedup_threshold must be in (0, 1], got {near_dedup_threshold}.")
    if not text_field:
        raise ValueError("--text_field must name the field that holds the text.")


def prepare(
    inputs: Sequence[str] | str,
    output: str,
    *,
    text_field: str = "text",
    text_mode: str = "file",
    fmt: str = "auto",
    splits: Sequence[float | str] = (0.8, 0.1, 0.1),
    tokenizer="byte",
    near_dedup: bool = False,
    near_dedup_threshold: float = 0.8,
    shard_docs: int = 50_000,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Prepares `inputs` into tokenized ArrayRecord splits under `output`; returns the manifest.

    `tokenizer` is a spec for `tokenizers.get_tokenizer` or a tokenizer object.
    """
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    fractions = parse_splits(splits)
    _check_options(text_mode, fmt, shard_docs, near_dedup_threshold, text_field)
    output = os.path.normpath(output)
    files = readers.expand_inputs(inputs)
    prepared_output.check_output(output, overwrite)
    tok = tokenizers.get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer

    config = {
        "inputs": inputs,
        "files": len(files),
        "text_field": text_field,
        "text_mode": text_mode,
        "format": fmt,
        "splits": list(fractions),
        "tokenizer": str(tokenizer) if isinstance(tokenizer, str) else type(tokenizer).__name__,
        "near_dedup": near_dedup,
        "near_dedup_threshold": near_dedup_threshold,
        "shard_docs": shard_docs,
        "strict": strict,
    }
    tmp = f"{output}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split in sources.SPLITS:
            os.makedirs(os.path.join(tmp, split))
        manifest = _run(files, tmp, tok, config, progress)
        prepared_output.check_usable(manifest)
        manifest["tokenizer"] = tok.describe()
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        prepared_output.publish(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _run(files: list[str], root: str, tok, config: dict, progress: bool) -> dict:
    """Streams every record of `files` through a `_Preparer`; returns the manifest."""
    prep = _Preparer(
        root,
        tok,
        config["splits"],
        config["near_dedup"],
        config["near_dedup_threshold"],
        config["shard_docs"],
        config["strict"],
    )
    bar = _Progress(progress)
    counts = prep.counts
    try:
        for path in files:
            records = readers.iter_file_records(
                path,
                text_field=config["text_field"],
                text_mode=config["text_mode"],
                fmt=config["format"],
            )
            for record in records:
                prep.add(record)
                bar.update(counts["read"], counts["kept"], prep.input_bytes)
        splits = prep.finish(root)
    finally:  # ends the progress line, so an error is a line of its own
        bar.update(counts["read"], counts["kept"], prep.input_bytes, final=True)
    seconds, docs_per_s, mb_per_s = bar.rate(counts["read"], prep.input_bytes)
    return {
        "format": FORMAT,
        "documents": counts,
        "splits": splits,
        "tokenizer": None,
        "config": config,
        "examples": prep.examples,
        # Timing, not content: compare preparations by their fingerprints.
        "throughput": {
            "seconds": round(seconds, 3),
            "input_mb": round(prep.input_bytes / 1e6, 3),
            "documents_per_s": round(docs_per_s, 1),
            "mb_per_s": round(mb_per_s, 3),
        },
    }


def _define_flags() -> None:
    """Defines the CLI flags; only when run as a program, so importing never claims names."""
    flags.DEFINE_multi_string("input", None, "Input file, glob or directory; repeatable.")
    flags.DEFINE_string("output", None, "Output directory; must not exist or be empty.")
    flags.DEFINE_string("text_field", "text", "JSONL key / Parquet column holding the text.")
    flags.DEFINE_enum("text_mode", "file", readers.TEXT_MODES, "Text files: a doc per file|line.")
    flags.DEFINE_enum("format", "auto", readers.FORMATS, "Input format; auto: by extension.")
    flags.DEFINE_list("splits", ["0.8", "0.1", "0.1"], "train,val,test fractions summing to 1.")
    flags.DEFINE_string("tokenizer", "byte", "byte, a tokenizer.json, a .model or a directory.")
    flags.DEFINE_bool("near_dedup", False, "Also drop near duplicates (MinHash/LSH).")
    flags.DEFINE_float("near_dedup_threshold", 0.8, "Jaccard similarity from which to drop.")
    flags.DEFINE_integer("shard_docs", 50_000, "Documents per ArrayRecord shard.")
    flags.DEFINE_bool("strict", False, "Stop at the first bad record instead of counting it.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --output.")
    flags.DEFINE_bool("progress", True, "Show a progress line on stderr.")


def main(argv: Sequence[str]) -> None:
    """Runs `prepare` on the flags and prints the counts, splits and throughput."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f.input or not f.output:
        raise app.UsageError("--input and --output are required.")
    with errors.reported("prepare: error"):  # one line, also for no space or permissions
        try:
            manifest = _prepare_from_flags(f)
        except (ValueError, FileExistsError) as e:  # options and inputs: the user's to fix
            raise errors.UserError(str(e)) from e
    print(json.dumps({"documents": manifest["documents"], "splits": manifest["splits"]}, indent=2))
    for kind, examples in manifest["examples"].items():
        print(f"{kind}: {manifest['documents'][kind]:,}, e.g. {examples[0]}")
    t = manifest["throughput"]
    print(
        f"throughput: {t['documents_per_s']:,.0f} documents/s, {t['mb_per_s']:.2f} MB/s "
        f"({manifest['documents']['read']:,} documents, {t['input_mb']:.2f} MB in "
        f"{t['seconds']:.2f} s) -> {f.output}"
    )


def _prepare_from_flags(f) -> dict:
    return prepare(
        f.input,
        f.output,
        text_field=f.text_field,
        text_mode=f.text_mode,
        fmt=f.format,
        splits=f.splits,
        tokenizer=f.tokenizer,
        near_dedup=f.near_dedup,
        near_dedup_threshold=f.near_dedup_threshold,
        shard_docs=f.shard_docs,
        strict=f.strict,
        overwrite=f.overwrite,
        progress=f.progress,
    )


def command() -> None:
    """The `jtrain-prepare` command (python -m jtrain.data.prepare)."""
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    command()
