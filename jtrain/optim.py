"""Optimizers and learning-rate schedules built from the `optimizer` and `schedule` configs.

Owns the mapping from config names to optax transformations, the warmup/decay schedules that
drive them, and the weight-decay mask that exempts norm scales and biases.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS: tuple[str, ...] = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear", "wsd")

# Leaf names that never get weight decay: shrinking them toward zero only hurts.
_NO_DECAY_NAMES = ("scale", "bias")
# Pytree keys nnx.Variable adds below the parameter's own name.
_VARIABLE_FIELDS = ("value", "raw_value")


def _check_name(kind: str, name: str, allowed: tuple[str, ...]) -> None:
    if name not in allowed:
        raise ValueError(f"Unknown {kind} {name!r}; choose one of {', '.join(allowed)}.")


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


def make_schedule(optimizer_cfg: Any, schedule_cfg: Any, total_steps: int) -> optax.Schedule:
    """Returns the learning rate as a function of the step: linear warmup, then the named shape."""
    name = schedule_cfg.name
    _check_name("schedule", name, SCHEDULES)
    peak = float(optimizer_cfg.lr)
    warmup = int(schedule_cfg.warmup_steps)
    end = peak * float(schedule_cfg.final_lr_ratio)
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}.")
    if warmup < 0:
        raise ValueError(f"schedule.warmup_steps must be >= 0, got {warmup}.")
    if warmup > total_steps:
        raise ValueError(
            f"schedule.warmup_steps={warmup} exceeds the {total_steps} training steps; "
            "lower warmup_steps or raise train.steps."
        )
    warmup_piece = (optax.linear_schedule(0.0, peak, transition_steps=warmup), warmup)
    after_warmup = total_steps - warmup

    if name == "constant":
        return _join([warmup_piece], optax.constant_schedule(peak))
    if name in ("cosine", "linear"):
        return _join([warmup_piece], _decay(name, peak, end, after_warmup))

    fraction = float(schedule_cfg.decay_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"schedule.decay_fraction must be in [0, 1], got {fraction}.")
    # The decay never eats into warmup: with a long warmup it starts right after it.
    decay_steps = min(round(fraction * total_steps), after_warmup)
    stable = (optax.constant_schedule(peak), after_warmup - decay_steps)
    return _join([warmup_piece, stable], _decay("linear", peak, end, decay_steps))


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


def _base_optimizer(cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    name, wd = cfg.name, float(cfg.weight_decay)
    if name == "adamw":
        return optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask
        )
    if name == "adafactor":
        # optax adds adafactor's decay after the lr scaling; scale it by the schedule here so
        # weight_decay means lr * wd * param per step, as for adamw, and not wd * param.
        return optax.adafactor(
            schedule,
            weight_decay_rate=(lambda step: wd * schedule(step)) if wd > 0 else None,
            weight_decay_mask=decay_mask if wd > 0 else None,
        )
    if name == "lion":
        return optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask)
    momentum = float(cfg.b1) or None  # None keeps no momentum buffer in the state.
    sgd = optax.sgd(schedule, momentum=momentum, nesterov=False)
    if wd > 0:
        # Decay joins the gradient before lr scaling, so it is scaled by the schedule too.
        return optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), sgd)
    return sgd


def make_optimizer(
    optimizer_cfg: Any, schedule_cfg: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule): optional global-norm clipping, then the named optimizer."""
    _check_name("optimizer", optimizer_cfg.name, OPTIMIZERS)
    schedule = make_schedule(optimizer_cfg, schedule_cfg, total_steps)
    tx = _base_optimizer(optimizer_cfg, schedule)
    clip = float(optimizer_cfg.clip_norm)
    if clip < 0:
        raise ValueError(f"optimizer.clip_norm must be >= 0 (0 = off), got {clip}.")
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx, schedule
