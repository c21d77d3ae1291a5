"""How `jtrain.plan` shows a plan: a few aligned lines, like a bill, from the JSON object."""

from __future__ import annotations

from jtrain import console

GIB = 2**30
KINDS = (
    ("parameters", "parameters"),
    ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"),
    ("activations", "activations"),
    ("gathered_weights", "gathered weights"),
    ("batch", "batch"),
)
_AOT_KINDS = ("arguments", "outputs", "temporaries", "total")


def note(line: str) -> None:
    """A status line while the plan is being made."""
    console.status(f"jtrain: {line}")


def render(plan: dict) -> str:
    """The plan as text: parameters, FLOPs and tokens, memory per device, time and cost."""
    mesh = ", ".join(f"{k} {v}" for k, v in plan["mesh"].items())
    lines = [
        f"plan of {plan['config']} on {plan['chips']} x {plan['accelerator']} ({mesh}; "
        f"{plan['microbatches']} micro-batch{'es' if plan['microbatches'] > 1 else ''})",
        _row("parameters", f"{plan['params']:,}", _params_detail(plan)),
        _row("FLOPs per token", _sci(plan["flops_per_token"]), "training: forward + backward"),
        _row("tokens", _sci(plan["tokens"]), _tokens_detail(plan)),
        "memory per device",
    ]
    mem = plan["memory_per_device_bytes"]
    for key, label in KINDS:
        lines.append(_row("  " + label, _gib(mem[key]), _memory_detail(plan, key)))
    lines.append(_row("  total", _gib(mem["total"]), _fit_detail(plan)))
    if plan.get("aot"):
        lines += _aot_lines(plan)
    if plan["suggested_mesh"]:
        lines.append(_row("suggested mesh", *_suggestion(plan["suggested_mesh"])))
    elif not plan["fits"]:
        lines.append(_row("suggested mesh", "none", "no mesh of these chips fits: add chips"))
    lines += [
        _row("step time", _seconds(plan["step_time_s"]), _time_detail(plan)),
        _row("run time", _seconds(plan["run_time_s"]), ""),
        _row("chip-hours", f"{plan['chip_hours']:,.1f}", ""),
        _row("cost", *_cost(plan)),
    ]
    return "\n".join(line.rstrip() for line in lines)


def _row(label: str, value: str, detail: str) -> str:
    return f"{label:<20}{value:>16}  {detail}"


def _sci(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3g}"


def _gib(value: int | None) -> str:
    if value is None:
        return "not modelled"
    for unit, size in (("GiB", GIB), ("MiB", 2**20)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value / 1024:.2f} KiB"


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.2f} s"
    hours, rest = divmod(int(round(s)), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _params_detail(plan: dict) -> str:
    detail = f"trained {plan['params_trained']:,}"
    for name, count in plan["frozen_parts"].items():
        what = "frozen base" if name == "base" else f"frozen {name}"
        detail += f", {what} {count:,} ({plan['frozen_dtypes'][name]})"
    return detail


def _tokens_detail(plan: dict) -> str:
    ratio = plan["tokens"] / plan["chinchilla_tokens"] if plan["chinchilla_tokens"] else 0
    return (
        f"steps x batch x seq_len; Chinchilla-optimal {_sci(plan['chinchilla_tokens'])} "
        f"(20 per parameter): {ratio:.1%} of it"
    )


def _memory_detail(plan: dict, key: str) -> str:
    if key == "activations":
        return f"remat {plan['remat']}, {plan['attention']} attention"
    if key == "gathered_weights":
        return "every layer's weights gathered by FSDP, with their float32 gradient"
    if key == "gradients" and plan["microbatches"] > 1:
        return "float32, twice: the micro-batches' sum and the current one"
    return ""


def _fit_detail(plan: dict) -> str:
    usable, hbm = plan["usable_bytes"], plan["hbm_bytes"]
    of = f"of {usable / GIB:.1f} GiB usable"
    if usable != hbm:
        of += f" ({hbm / GIB:.1f} GiB HBM x XLA_PYTHON_CLIENT_MEM_FRACTION)"
    share = plan["memory_per_device_bytes"]["total"] / usable
    verdict = "fits" if plan["fits"] else "does NOT fit"
    return f"{of}: {share:.0%}, {verdict} (the plan keeps 10% for XLA's own buffers)"


def _aot_lines(plan: dict) -> list[str]:
    """XLA's figures for the compiled step, each beside the estimate it corresponds to:
    arguments are the state and the batch; temporaries what the step makes on the way."""
    report, mem = plan["aot"], plan["memory_per_device_bytes"]
    compiled = report["memory_per_device_bytes"]
    estimates = {
        "arguments": ("parameters", "optimizer_state", "batch"),
        "temporaries": ("gradients", "activations", "gathered_weights"),
        "total": ("total",),
    }
    lines = [f"compiled for {report['topology']} by XLA in {report['compile_s']:.0f} s"]
    for kind in _AOT_KINDS:
        parts = estimates.get(kind)
        detail = f"plan: {_gib(sum(mem[k] or 0 for k in parts))}" if parts else ""
        lines.append(_row(f"  {kind}", _gib(compiled[kind]), detail))
    planned = f"plan: {_sci(plan['flops_per_step'])}"
    lines.append(_row("  FLOPs per step", _sci(report["flops_per_step"]), planned))
    return lines


def _suggestion(s: dict) -> tuple[str, str]:
    value = f"{s['data']}x{s['fsdp']}x{s['tensor']}"
    detail = (
        f"data {s['data']}, fsdp {s['fsdp']}, tensor {s['tensor']}, {s['microbatches']} "
        f"micro-batches: {s['total_bytes'] / GIB:.2f} GiB per device "
        "(least tensor, then fewest micro-batches, then most data parallelism)"
    )
    return value, detail


def _time_detail(plan: dict) -> str:
    peak = plan["peak_flops"] / 1e12
    return f"at {plan['mfu']:.0%} MFU of {peak:,.0f} TFLOP/s (dense bf16) per chip"


def _cost(plan: dict) -> tuple[str, str]:
    if plan["cost_usd"] is None:
        return "-", "give --price=USD_PER_CHIP_HOUR"
    return f"${plan['cost_usd']:,.0f}", f"at ${plan['price_per_chip_hour']:g} per chip-hour"
