"""What every jtrain command does first: refuse stray arguments, quiet absl's INFO logs."""

from __future__ import annotations

from absl import app, flags, logging


def start(argv: list[str]) -> None:
    """Raises UsageError for positional arguments; logs at WARNING unless --verbosity is set."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save and restore at INFO
