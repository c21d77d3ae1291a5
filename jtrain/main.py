"""Command-line entry point: python -m jtrain.main (or jtrain-train) --config=configs/NAME.py
--workdir=DIR; --config=NAME names a recipe that ships with jtrain (jtrain.recipes)."""

from absl import flags

from jtrain import cli, distributed, errors, run

_CONFIG = cli.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics and checkpoints.")
_MODE = flags.DEFINE_enum(
    "mode", "train", run.MODES, "train | eval (evaluate eval.split without training)."
)
_STEP = flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: latest).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, n).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process run JAX detects (TPU pod, GKE, SLURM, Open MPI)."
)


def main(argv: list[str]) -> None:
    cli.start(argv)
    cli.required("config", "workdir")
    with errors.reported():
        # Before anything touches a device.
        distributed.initialize(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value
        )
        if _MODE.value == "train":
            run.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        else:
            run.evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value)


def command() -> None:
    """The `jtrain-train` command: `python -m jtrain.main` as a console script."""
    cli.run(main)


if __name__ == "__main__":
    command()
