"""python -m jtrain.plan (jtrain-plan): what a config costs and whether it fits, before a run.

    python -m jtrain.plan --config=llama3_8b --accelerator=v5p --chips=64 [--mfu=0.4]
        [--price=USD_PER_CHIP_HOUR] [--aot=v5p:4x4x4] [--json] [--config.a.b=VALUE ...]

Nothing is allocated: the state's shapes come from `jax.eval_shape` of the run's own
initialiser and their per-device bytes from jtrain's shardings over an abstract mesh of the
chips (jtrain.plan_memory); FLOPs from the task's own count (what MFU is measured with); time
and cost from the accelerator's dense bf16 peak at the given MFU (jtrain.accelerators).
`--aot=TOPOLOGY` also compiles the real step for a TPU topology (jtrain.aot) and prints XLA's
figures beside the estimates.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys

from absl import flags

from jtrain import accelerators, cli, errors, plan_mesh, plan_report, tasks
from jtrain import config as config_lib
from jtrain import mesh as mesh_lib
from jtrain import plan_memory as memory
from jtrain.models import attention_impl
from jtrain.state import BASE

try:  # compile-time figures: jtrain.aot needs libtpu, and may be missing from older installs
    from jtrain import aot
except ImportError:
    aot = None

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. (2022): compute-optimal tokens per parameter

_CONFIG = cli.config_flag()
_ACCELERATOR = flags.DEFINE_string(
    "accelerator", "v5p", f"The chip: {', '.join(accelerators.ACCELERATORS)}."
)
_CHIPS = flags.DEFINE_integer(
    "chips", None, "Chips in the run (default: the config's mesh, or the --aot topology's)."
)
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation the step time assumes, in (0, 1].")
_PRICE = flags.DEFINE_float("price", 0.0, "USD per chip-hour, for the cost (0 = no cost).")
_AOT = flags.DEFINE_string("aot", "", "A TPU topology (v5p:4x4x4) to compile the step for.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")


def make_plan(config, accelerator: str, chips: int | None, mfu: float, price: float) -> dict:
    """The plan of a config on `chips` of `accelerator`, as the JSON object --json prints."""
    acc = accelerators.get(accelerator)
    _check_numbers(mfu, price)
    kernel = attention_kernel(config, acc)
    config.model.attention = "xla"  # shapes do not depend on it; the host's device must not
    for change in config_lib.prepare(config):
        plan_report.note(f"from {config.model.init_from}: {change}")
    chips = _chips(config, chips)
    try:
        sizes = mesh_lib.mesh_shape(config.mesh, chips)
    except errors.UserError as err:
        raise errors.UserError(f"--chips={chips} does not fit the config's mesh: {err}") from None
    task = tasks.get(config)
    state = memory.abstract_state(config, task)
    frozen = memory.frozen_parts(state)
    trained = memory.count(state.params)
    params = trained + frozen.get(BASE, 0)
    per_example = task.flops_per_example(weight_grads=BASE not in frozen)
    per_token_tokens = task.tokens_per_example()
    t = config.train
    tokens = t.steps * t.batch_size * per_token_tokens
    step_time = per_example * t.batch_size / (chips * acc.peak_flops * mfu)
    run_s = step_time * t.steps
    chip_hours = chips * run_s / 3600
    mem = plan_mesh.memory_bytes(config, state, sizes, t.microbatches, kernel)
    usable = acc.usable_bytes()
    budget = int(usable * plan_mesh.FIT_SHARE)
    fits = mem["total"] <= budget
    return {
        "accelerator": acc.name,
        "accelerator_source": acc.source,
        "chips": chips,
        "mesh": dict(zip(mesh_lib.MESH_AXES, sizes, strict=True)),
        "microbatches": t.microbatches,
        "params": params,
        "params_trained": trained,
        "params_frozen": sum(frozen.values()),
        "frozen_parts": frozen,
        "frozen_dtypes": memory.frozen_dtypes(state),
        "flops_per_example": per_example,
        "flops_per_step": per_example * t.batch_size,
        "flops_per_token": per_example / per_token_tokens if per_token_tokens else None,
        "chinchilla_tokens": CHINCHILLA_TOKENS_PER_PARAM * params,
        "tokens": tokens,
        "attention": kernel,
        "remat": config.model.get("remat", "none"),
        "memory_per_device_bytes": mem,
        "hbm_bytes": acc.hbm_bytes,
        "usable_bytes": usable,
        "fits": fits,
        "suggested_mesh": None if fits else plan_mesh.suggest(config, state, chips, kernel, budget),
        "mfu": mfu,
        "peak_flops": acc.peak_flops,
        "step_time_s": step_time,
        "run_time_s": run_s,
        "chip_hours": chip_hours,
        "price_per_chip_hour": price or None,
        "cost_usd": chip_hours * price if price else None,
    }


def attention_kernel(config, acc: accelerators.Accelerator) -> str:
    """The attention kernel a run of `config` uses on `acc` (not on this host)."""
    m = config.model
    requested = m.get("attention", "xla")
    if m.get("kind", "transformer") != "transformer" or requested == "xla":
        return "xla"
    device = attention_impl.Device("gpu", acc.compute_capability, 99_999) if acc.is_gpu else None
    device = device or attention_impl.Device("tpu")
    window = bool(m.get("sliding_window", 0))
    try:
        kernel, _ = attention_impl.choose(
            requested, device, dtype=m.dtype, head_dim=m.head_dim, sliding_window=window
        )
    except errors.UserError as err:
        raise errors.UserError(f"on --accelerator={acc.name}: {err}") from None
    return kernel


def _check_numbers(mfu: float, price: float) -> None:
    if not 0 < mfu <= 1:
        raise errors.UserError(f"--mfu={mfu} is invalid: allowed: a fraction in (0, 1], e.g. 0.4")
    if price < 0:
        raise errors.UserError(f"--price={price} is invalid: allowed: USD per chip-hour, >= 0")


def _chips(config, chips: int | None) -> int:
    if chips is not None:
        if chips < 1:
            raise errors.UserError(f"--chips={chips} is invalid: allowed: a positive integer")
        return chips
    sizes = [int(config.mesh[a]) for a in mesh_lib.MESH_AXES]
    if -1 in sizes:
        raise errors.UserError(
            "--chips is missing: the config's mesh has an axis of -1 (all remaining chips), "
            "so give the number of chips, e.g. --chips=64"
        )
    return int(sizes[0] * sizes[1] * sizes[2])


def with_compiled(plan: dict, config, topology: str) -> dict:
    """The plan with jtrain.aot's figures for the step compiled for `topology` under "aot"."""
    if aot is None:
        raise errors.UserError(
            "--aot needs jtrain.aot, which this install of jtrain lacks: update jtrain"
        )
    report = aot.compile_report(config, topology)
    if report["chips"] != plan["chips"]:
        raise errors.UserError(
            f"--aot={topology} has {report['chips']} chips but the plan is for "
            f"--chips={plan['chips']}: give the same number (or leave --chips out)"
        )
    return {**plan, "aot": report}


def main(argv: list[str]) -> None:
    cli.start(argv)
    cli.required("config")
    with errors.reported():
        out = sys.stderr if _JSON.value else sys.stdout
        with contextlib.redirect_stdout(out):  # status lines must not break the JSON
            plan = build(_CONFIG.value, _AOT.value)
    print(json.dumps(plan, indent=2) if _JSON.value else plan_report.render(plan))


def build(config, topology: str) -> dict:
    """The plan the flags ask for, compiled figures included with --aot."""
    chips = _CHIPS.value
    if topology and chips is None and topology_chips(topology):
        chips = topology_chips(topology) * math.prod(mesh_lib.dcn_shape(config.mesh))
    plan = make_plan(config, _ACCELERATOR.value, chips, _MFU.value, _PRICE.value)
    plan = {"config": flags.FLAGS["config"].config_filename, **plan}
    return with_compiled(plan, config, topology) if topology else plan


def topology_chips(topology: str) -> int | None:
    """The chips of a TPU topology written NAME:AxB[xC] (v5p:4x4x8 = 128); None otherwise."""
    dims = topology.partition(":")[2].split("x")
    if not all(d.isdigit() and int(d) > 0 for d in dims):
        return None
    return int(math.prod(int(d) for d in dims))


def command() -> None:
    """The `jtrain-plan` command: `python -m jtrain.plan` as a console script."""
    cli.run(main)


if __name__ == "__main__":
    command()
