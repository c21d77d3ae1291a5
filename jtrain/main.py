"""Command-line entry point: python -m jtrain.main --config=configs/NAME.py --workdir=DIR."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jtrain import run
from jtrain.checkpoint import CheckpointError
from jtrain.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/NAME.py[:ARG]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and checkpoints.")
_MODE = flags.DEFINE_enum("mode", "train", run.MODES, "What to do with the config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        if _MODE.value == "train":
            run.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, CheckpointError, run.NonFiniteError) as err:
        # Problems the user can fix: the message says how; a traceback would bury it.
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    app.run(main)
