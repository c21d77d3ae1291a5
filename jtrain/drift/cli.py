r"""Compares new data with a run's reference profile and says whether it drifted.

    python -m jtrain.drift --workdir=RUN --data=SOURCE [--output=DIR] [--alpha=0.05]
    python -m jtrain.drift --workdir=RUN --write_profile     # a run made without a profile

SOURCE is a data source of the run's kind: csv:FILE or parquet:FILE (a glob pools files) for
tables, images:DIR for images, files:GLOB or a registered set for language models. Writes
DIR/report.json and DIR/report.html (default WORKDIR/drift/report/) and prints the verdict.
Exit status: 0 no drift, 1 drift, 2 an error (one `error:` line), so a scheduled job can act.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from jtrain import checkpoint, cli
from jtrain.drift import build, domain, report
from jtrain.errors import UserError

NO_DRIFT, DRIFT, ERROR = 0, 1, 2


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The workdir of a finished run with a drift profile.")
    flags.DEFINE_string("data", None, "The new data: a source spec the run's task reads.")
    flags.DEFINE_string("output", None, "Directory for report.json and report.html.")
    flags.DEFINE_float("alpha", report.ALPHA, "False-alarm rate of the whole report.")
    flags.DEFINE_integer("permutations", domain.PERMUTATIONS, "Domain-classifier null fits.")
    flags.DEFINE_integer("seed", 0, "Seed of the permutations and subsamples.")
    flags.DEFINE_bool("write_profile", False, "Write the run's profile (from its train split).")


def run(workdir: str, data: str | None, output: str | None, **options) -> int:
    """What the command does; returns its exit status."""
    if not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir}: no such directory")
    if not 0 < options.get("alpha", report.ALPHA) < 1:
        raise UserError(f"--alpha={options['alpha']} is invalid: give a number in (0, 1)")
    permutations = options.get("permutations", domain.PERMUTATIONS)
    if permutations == 1 or permutations < 0:
        raise UserError(
            f"--permutations={permutations} is invalid: give 0 (no domain "
            "classifier) or at least 2 (its null needs a spread)"
        )
    if data is None:
        raise UserError("--data is required: name the new data, e.g. --data=csv:new.csv")
    result, reference, current = build.drift_report(workdir, data, **options)
    output = output or os.path.join(workdir, "drift", "report")
    paths = build.save_report(result, output, reference, current)
    for line in report.summary_lines(result):
        print(line)
    print(f"jtrain.drift: wrote {', '.join(paths)}")
    return DRIFT if result["drift"] else NO_DRIFT


def main(argv: list[str]) -> None:
    cli.start(argv)
    f = flags.FLAGS
    try:
        if f.write_profile:
            print(f"jtrain.drift: wrote {build.write_profile_of_run(f.workdir)}")
            sys.exit(NO_DRIFT)
        status = run(
            f.workdir, f.data, f.output, alpha=f.alpha, permutations=f.permutations, seed=f.seed
        )
    except (UserError, checkpoint.CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)  # status 2: 1 means drift
        sys.exit(ERROR)
    sys.exit(status)


def command() -> None:
    """The `jtrain-drift` command (python -m jtrain.drift)."""
    _define_flags()
    flags.mark_flag_as_required("workdir")
    cli.run(main)
