"""Optimizers and learning-rate schedules built from the `optimizer` and `schedule` configs.

Owns the mapping from config names to optax transformations, the warmup/decay schedules that
drive them, and the weight-decay mask that exempts norm scales and biases. `validate` is the
one place the optimizer.* and schedule.* values are checked; the builders assume it passed.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Leaf names that never get weight decay: shrinking them toward zero only hurts.
_NO_DECAY_NAMES = ("scale", "bias")
# Pytree keys nnx.Variable adds below the parameter's own name.
_VARIABLE_FIELDS = ("value", "raw_value")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config.{key}={value!r} is invalid: {allowed}.")


def _one_of(key: str, value: Any, allowed: Sequence[str]) -> None:
    _require(value in allowed, key, value, f"allowed: {', '.join(allowed)}")


def effective_warmup(schedule_cfg: Any, total_steps: int) -> tuple[int, str | None]:
    """Returns (warmup steps used, a note for the log or None): a too-long warmup is clamped.

    A warmup longer than the run (a short smoke run of a long recipe) becomes 10% of the run,
    rounded down, so `--config.train.steps=20` alone works.
    """
    warmup = schedule_cfg.warmup_steps
    _require(warmup >= 0, "schedule.warmup_steps", warmup, "must be >= 0")
    if warmup <= total_steps:
        return int(warmup), None
    clamped = total_steps // 10
    note = (
        f"schedule.warmup_steps={warmup} is longer than the {total_steps}-step run: warming up "
        f"over {clamped} steps (10% of train.steps) instead; set "
        f"--config.schedule.warmup_steps=N (0 to {total_steps}) to choose."
    )
    return clamped, note


def validate(config: Any) -> list[str]:
    """Raises ValueError naming the first bad optimizer.* or schedule.* value; returns notes."""
    o, s = config.optimizer, config.schedule
    _one_of("optimizer.name", o.name, OPTIMIZERS)
    _require(o.lr > 0, "optimizer.lr", o.lr, "must be positive")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    _require(o.clip_norm >= 0, "optimizer.clip_norm", o.clip_norm, "must be >= 0 (0 = off)")
    for key in ("b1", "b2"):
        _require(0 <= o[key] < 1, f"optimizer.{key}", o[key], "must be in [0, 1)")
    _one_of("schedule.name", s.name, SCHEDULES)
    _, note = effective_warmup(s, config.train.steps)
    ratio, fraction = s.final_lr_ratio, s.decay_fraction
    _require(0 <= ratio <= 1, "schedule.final_lr_ratio", ratio, "must be in [0, 1]")
    _require(0 < fraction <= 1, "schedule.decay_fraction", fraction, "must be in (0, 1]")
    return [note] if note else []


def _join(pieces: Sequence[tuple[optax.Schedule, int]], tail: optax.Schedule) -> optax.Schedule:
    """Runs each (schedule, length) piece in turn, then `tail`; zero-length pieces are skipped."""
    schedules, boundaries, at = [], [], 0
    for schedule, length in pieces:
        if length > 0:
            schedules.append(schedule)
            at += length
            boundaries.append(at)
    joined = optax.join_schedules([*schedules, tail], boundaries)
    # Constant pieces return Python floats; callers (logging, jit) expect an array.
    return lambda step: jnp.asarray(joined(step), jnp.float32)


def _decay(kind: str, peak: float, end: float, steps: int) -> optax.Schedule:
    """Decays from `peak` to `end` over `steps` and holds `end` after; `end` at once if 0 steps."""
    if steps <= 0:
        return optax.constant_schedule(end)
    if kind == "cosine":
        alpha = end / peak if peak else 0.0
        return optax.cosine_decay_schedule(peak, decay_steps=steps, alpha=alpha)
    return optax.linear_schedule(peak, end, transition_steps=steps)


_Pieces = list[tuple[optax.Schedule, int]]
# A shape maps (peak lr, end lr, steps after warmup, schedule config, total steps) to the
# (schedule, length) pieces and the tail that follow the warmup.
_Shape = Callable[[float, float, int, Any, int], tuple[_Pieces, optax.Schedule]]


def _wsd(
    peak: float, end: float, steps: int, schedule_cfg: Any, total_steps: int
) -> tuple[_Pieces, optax.Schedule]:
    # The decay never eats into warmup: with a long warmup it starts right after it.
    decay_steps = min(round(float(schedule_cfg.decay_fraction) * total_steps), steps)
    stable = (optax.constant_schedule(peak), steps - decay_steps)
    return [stable], _decay("linear", peak, end, decay_steps)


_SHAPES: dict[str, _Shape] = {
    "constant": lambda peak, end, steps, *_: ([], optax.constant_schedule(peak)),
    "cosine": lambda peak, end, steps, *_: ([], _decay("cosine", peak, end, steps)),
    "linear": lambda peak, end, steps, *_: ([], _decay("linear", peak, end, steps)),
    "wsd": _wsd,
}
SCHEDULES: tuple[str, ...] = tuple(_SHAPES)


def make_schedule(optimizer_cfg: Any, schedule_cfg: Any, total_steps: int) -> optax.Schedule:
    """Returns the learning rate as a function of the step: linear warmup, then the named shape.

    A warmup longer than the run is clamped, as `effective_warmup` says.
    """
    peak = float(optimizer_cfg.lr)
    end = peak * float(schedule_cfg.final_lr_ratio)
    warmup, _ = effective_warmup(schedule_cfg, total_steps)
    warmup_piece = (optax.linear_schedule(0.0, peak, transition_steps=warmup), warmup)
    shape = _SHAPES[schedule_cfg.name]
    pieces, tail = shape(peak, end, total_steps - warmup, schedule_cfg, total_steps)
    return _join([warmup_piece, *pieces], tail)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _decays(path: tuple[Any, ...]) -> bool:
    names = [_key_name(k) for k in path]
    # nnx.State paths end in the Variable's own field (`.value`), not the parameter's name.
    if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] in _VARIABLE_FIELDS:
        names.pop()
    if names and names[-1] in _NO_DECAY_NAMES:
        return False
    return not any("norm" in n.lower() for n in names)


def decay_mask(params: Any) -> Any:
    """Returns a bool pytree like `params`: True where weight decay applies, by leaf name."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _decays(path), params)


def _adamw(cfg: Any, schedule: optax.Schedule, wd: float) -> optax.GradientTransformation:
    return optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask
    )


def _adafactor(cfg: Any, schedule: optax.Schedule, wd: float) -> optax.GradientTransformation:
    # optax adds adafactor's decay after the lr scaling; scale it by the schedule here so
    # weight_decay means lr * wd * param per step, as for adamw, and not wd * param.
    return optax.adafactor(
        schedule,
        weight_decay_rate=(lambda step: wd * schedule(step)) if wd > 0 else None,
        weight_decay_mask=decay_mask if wd > 0 else None,
    )


def _lion(cfg: Any, schedule: optax.Schedule, wd: float) -> optax.GradientTransformation:
    return optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask)


def _sgd(cfg: Any, schedule: optax.Schedule, wd: float) -> optax.GradientTransformation:
    momentum = float(cfg.b1) or None  # None keeps no momentum buffer in the state.
    sgd = optax.sgd(schedule, momentum=momentum, nesterov=False)
    if wd > 0:
        # Decay joins the gradient before lr scaling, so it is scaled by the schedule too.
        return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), sgd)
    return sgd


_OPTIMIZERS: dict[str, Callable[[Any, optax.Schedule, float], optax.GradientTransformation]] = {
    "adamw": _adamw,
    "adafactor": _adafactor,
    "lion": _lion,
    "sgd": _sgd,
}
OPTIMIZERS: tuple[str, ...] = tuple(_OPTIMIZERS)


def make_optimizer(
    optimizer_cfg: Any, schedule_cfg: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule): optional global-norm clipping, then the named optimizer."""
    schedule = make_schedule(optimizer_cfg, schedule_cfg, total_steps)
    build = _OPTIMIZERS[optimizer_cfg.name]
    tx = build(optimizer_cfg, schedule, float(optimizer_cfg.weight_decay))
    clip = float(optimizer_cfg.clip_norm)
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx, schedule
